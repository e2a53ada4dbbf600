package registry

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/strata-oci/strata/internal/store"
	"golang.org/x/net/netutil"
)

// ServeConfig is what Serve needs beyond the registry itself.
type ServeConfig struct {
	Store   *store.Store
	Logger  *slog.Logger
	Metrics *Metrics
	// UploadTTL is how long an idle upload session lives (default 24h).
	UploadTTL time.Duration
	// Users, if set, are the accounts allowed to use the registry; without
	// them, anyone may push and pull.
	Users Users
	// AnonymousPull lets requests without credentials read when Users is set.
	AnonymousPull bool
	// Access restricts the accounts of Users to their grants (nil: all).
	Access Access
	// Token, if set, checks bearer tokens of a token server instead of
	// Users.
	Token *TokenAuth
	// TLSCert and TLSKey switch on HTTPS.
	TLSCert, TLSKey string
	// IdleTimeout closes keep-alive connections idle this long (default
	// 2 minutes); MaxConnections bounds the connections served at once
	// (default 1024; more wait to be accepted).
	IdleTimeout    time.Duration
	MaxConnections int
}

// Handler returns reg with /metrics beside it and request logging around it.
func Handler(reg *Registry, cfg ServeConfig) http.Handler {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	var h http.Handler = reg
	if cfg.Users != nil || cfg.Token != nil {
		h = Authorize(h, AuthConfig{Users: cfg.Users, Access: cfg.Access, AnonymousPull: cfg.AnonymousPull, Token: cfg.Token})
	}
	if cfg.Metrics != nil {
		h = cfg.Metrics.Wrap(h, reg.HasExtension)
		mux.Handle("/metrics", cfg.Metrics.Handler())
	}
	mux.Handle("/v2/", h)
	mux.Handle("/v2", h)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		mux.ServeHTTP(sw, r)
		log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", sw.code,
			"bytes", sw.n, "duration", time.Since(start))
	})
}

// Serve serves h on ln until ctx is done, purging stale upload sessions in
// the background, then shuts down gracefully.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, cfg ServeConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ttl := cfg.UploadTTL
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	idle := cfg.IdleTimeout
	if idle <= 0 {
		idle = 2 * time.Minute
	}
	maxConns := cfg.MaxConnections
	if maxConns <= 0 {
		maxConns = 1024
	}
	ln = netutil.LimitListener(ln, maxConns)
	// No read or write timeout for whole requests: blob uploads and
	// downloads stream for as long as their size needs on a slow link.
	// Headers must come within ReadHeaderTimeout, and idle keep-alive
	// connections are closed.
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: idle,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	go func() {
		t := time.NewTicker(min(ttl/4, 10*time.Minute))
		defer t.Stop()
		for {
			if n, err := cfg.Store.PurgeUploads(ctx, ttl); err != nil {
				log.Warn("purging upload sessions", "err", err)
			} else if n > 0 {
				log.Info("purged stale upload sessions", "count", n)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	errc := make(chan error, 1)
	go func() {
		if cfg.TLSCert != "" {
			errc <- srv.ServeTLS(ln, cfg.TLSCert, cfg.TLSKey)
		} else {
			errc <- srv.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := srv.Shutdown(sctx)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		return err
	}
}
