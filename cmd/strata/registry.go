package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/mirror"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

func newRegistryCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "registry", Short: "Run the strata registry"}
	var addr, root, cert, key string
	var workers int
	var htpasswd, accessFile, authMode, tokenRealm, tokenIssuer, tokenService, tokenCert string
	var anonPull bool
	var upstream, upUser, upPassFile string
	var upTTL, idle, reqTimeout time.Duration
	var maxConns, maxUploads int
	var maxBlob int64
	var config string
	var storage storageFlags
	serve := &cobra.Command{
		Use:   "serve",
		Short: "Serve an OCI registry with layer mounts from a directory (foreground)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := g.logger()
			unlock, err := store.LockRoot(storage.localDir(root))
			if err != nil {
				return err
			}
			defer unlock()
			st, err := storage.open(cmd.Context(), cmd, root)
			if err != nil {
				return err
			}
			metrics := registry.NewMetrics()
			cfg := registry.ServeConfig{Store: st, Logger: log, Metrics: metrics, TLSCert: cert, TLSKey: key, AnonymousPull: anonPull,
				IdleTimeout: idle, MaxConnections: maxConns}
			switch {
			case authMode == "token":
				if htpasswd != "" || accessFile != "" || anonPull {
					return usageError{cmd, fmt.Errorf("--auth token takes no --htpasswd, --access or --anonymous-pull: the token server decides (anonymous pulls are its tokens without credentials)")}
				}
				if cfg.Token, err = registry.NewTokenAuth(tokenRealm, tokenIssuer, tokenService, tokenCert); err != nil {
					return usageError{cmd, err}
				}
			case authMode == "htpasswd" || authMode == "" && htpasswd != "":
				if htpasswd == "" {
					return usageError{cmd, fmt.Errorf("--auth htpasswd needs --htpasswd FILE")}
				}
				if cfg.Users, err = registry.LoadHtpasswd(htpasswd); err != nil {
					return err
				}
				if accessFile != "" {
					if cfg.Access, err = registry.LoadAccess(accessFile); err != nil {
						return err
					}
				}
			case authMode == "" || authMode == "none":
				if htpasswd != "" || accessFile != "" || anonPull {
					// (--htpasswd without --auth is the case above.)
					return usageError{cmd, fmt.Errorf("--auth none takes no --htpasswd, and --access and --anonymous-pull need it")}
				}
			default:
				return usageError{cmd, fmt.Errorf("--auth %q: want none, htpasswd or token", authMode)}
			}
			if authMode != "token" && tokenRealm+tokenIssuer+tokenService+tokenCert != "" {
				return usageError{cmd, fmt.Errorf("--token-realm, --token-issuer, --token-service and --token-cert need --auth token")}
			}
			var mir *mirror.Mirror
			exp, err := expand.New(st, expand.Options{
				Logger:   log,
				Workers:  workers,
				OnDone:   func(outcome string) { metrics.Expansion.WithLabelValues(outcome).Inc() },
				Fetching: func(repo string, d digest.Digest) bool { return mir != nil && mir.Fetching(repo, d) },
			})
			if err != nil {
				return err
			}
			go exp.Run(cmd.Context())
			opts := registry.Options{Logger: log, Metrics: metrics, OnManifest: exp.OnManifest,
				MaxBlobSize: maxBlob, MaxUploadsPerClient: maxUploads, RequestTimeout: reqTimeout}
			if upstream != "" {
				if mir, err = newMirror(upstream, upUser, upPassFile, upTTL, st, exp, log); err != nil {
					return usageError{cmd, err}
				}
				defer mir.Close()
				opts.Upstream, opts.OnManifest = mir, nil
				log.Info("read-only pull-through mirror", "upstream", upstream, "ttl", upTTL)
			}
			reg := registry.New(st, opts)
			reg.Extension(api.Extension, exp.Handler(func(r *http.Request) (string, string) {
				return registry.RepoFromContext(r.Context())
			}))
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			scheme := "http"
			if cert != "" {
				scheme = "https"
			}
			log.Info("registry listening", "url", fmt.Sprintf("%s://%s", scheme, ln.Addr()), "storage", storage.where(root), "root", root)
			return registry.Serve(cmd.Context(), ln, registry.Handler(reg, cfg), cfg)
		},
	}
	serve.Flags().StringVar(&addr, "addr", "127.0.0.1:5000", "listen address HOST:PORT")
	serve.Flags().StringVar(&root, "root", "/var/lib/strata/registry", "registry storage directory (with --storage s3://: the local one, of the expansion state)")
	storage.add(serve, true)
	serve.Flags().StringVar(&htpasswd, "htpasswd", "", "require basic auth with the bcrypt accounts of this htpasswd file")
	serve.Flags().BoolVar(&anonPull, "anonymous-pull", false, "with --htpasswd: let anyone pull, only accounts push and delete")
	serve.Flags().StringVar(&accessFile, "access", "", "with --htpasswd: a TOML file of each account's repository patterns and actions (docs/config.md); accounts it does not name may do only what anyone may")
	serve.Flags().StringVar(&authMode, "auth", "", "none, htpasswd (basic auth with --htpasswd; the default when it is given) or token (bearer tokens of a token server: --token-*)")
	serve.Flags().StringVar(&tokenRealm, "token-realm", "", "with --auth token: the token server's URL clients are sent to")
	serve.Flags().StringVar(&tokenIssuer, "token-issuer", "", "with --auth token: the issuer (iss) tokens must name")
	serve.Flags().StringVar(&tokenService, "token-service", "", "with --auth token: this registry's service name (the tokens' audience)")
	serve.Flags().StringVar(&tokenCert, "token-cert", "", "with --auth token: PEM certificates or public keys whose keys sign the tokens")
	serve.Flags().IntVar(&workers, "expand-workers", 2, "layers expanded concurrently")
	serve.Flags().DurationVar(&idle, "idle-timeout", 2*time.Minute, "close keep-alive connections idle this long")
	serve.Flags().IntVar(&maxConns, "max-connections", 1024, "connections served at once (more wait to be accepted)")
	serve.Flags().DurationVar(&reqTimeout, "request-timeout", registry.DefaultRequestTimeout, "bound on reading and answering requests that do not stream blobs (manifests, tags, catalog, referrers)")
	serve.Flags().Int64Var(&maxBlob, "max-blob-size", registry.DefaultMaxBlobSize, "largest blob a push may store, in bytes (-1: no limit); larger pushes get 413")
	serve.Flags().IntVar(&maxUploads, "max-uploads-per-client", registry.DefaultMaxUploadsPerClient, "upload sessions one client address may hold open (-1: no limit); more get 429")
	serve.Flags().StringVar(&cert, "tls-cert", "", "TLS certificate file (enables HTTPS)")
	serve.Flags().StringVar(&key, "tls-key", "", "TLS key file")
	serve.Flags().StringVar(&upstream, "upstream", "", "serve as a read-only pull-through mirror of this registry (https://registry-1.docker.io, http://HOST:PORT)")
	serve.Flags().StringVar(&upUser, "upstream-username", "", "with --upstream: the account on the upstream")
	serve.Flags().StringVar(&upPassFile, "upstream-password-file", "", "with --upstream: a file holding the account's password or token")
	serve.Flags().DurationVar(&upTTL, "upstream-ttl", 10*time.Minute, "with --upstream: how long a tag is served before it is checked against the upstream again")
	addConfigFlag(serve, &config)
	cmd.AddCommand(serve, newRegistryGCCmd(g))
	return cmd
}

// newMirror makes the mirror of the registry at upstream (a URL), with
// static credentials when a username is given.
func newMirror(upstream, user, passFile string, ttl time.Duration, st *store.Store, exp *expand.Service, log *slog.Logger) (*mirror.Mirror, error) {
	u, err := url.Parse(upstream)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
		return nil, fmt.Errorf("--upstream %q: want http(s)://HOST[:PORT]", upstream)
	}
	hosts := &remote.Hosts{}
	if u.Scheme == "http" {
		hosts.AllowPlainHTTP(u.Host)
	}
	var creds remote.CredentialFunc
	if user != "" {
		b, err := os.ReadFile(passFile)
		if err != nil {
			return nil, fmt.Errorf("--upstream-password-file: %w", err)
		}
		c := remote.Credential{Username: user, Password: strings.TrimRight(string(b), "\r\n")}
		creds = func(context.Context, string) (remote.Credential, error) { return c, nil }
	}
	client := remote.New(remote.Options{Hosts: hosts, Credentials: creds, Logger: log,
		Retry: remote.RetryPolicy{Attempts: 3, MaxElapsed: 10 * time.Second}})
	return mirror.New(mirror.Options{Store: st, Client: client, Registry: u.Host, TTL: ttl, OnManifest: exp.OnManifest, Logger: log}), nil
}
