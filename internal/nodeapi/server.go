package nodeapi

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/remote"
)

// Backend is what the daemon serves: a node.Manager.
type Backend interface {
	Pull(ctx context.Context, ref string) (*node.Image, error)
	Acquire(ctx context.Context, req node.AcquireRequest) (*node.Lease, error)
	Release(ctx context.Context, id string) error
	Leases() []*node.Lease
	LeaseByUnion(dir string) (string, bool)
	Images() ([]*node.Image, error)
	RemoveImage(ctx context.Context, ref string) (*node.GCReport, error)
	GC(ctx context.Context) (*node.GCReport, error)
	Downloads() []node.Download
	DF() *node.DFReport
	// ReapDead ends the leases of processes that exited.
	ReapDead(ctx context.Context)
	// Busy reports work of the node's own under way (the daemon stays).
	Busy() bool
	// Hosts is how the node reaches registries; a request's PlainHTTP
	// marks its registry there.
	Hosts() *remote.Hosts
	// Close unmounts everything, keeping the lease records.
	Close(ctx context.Context)
}

// ServeOptions configure the daemon.
type ServeOptions struct {
	// Root is the node root: the socket is SocketPath(Root). The caller
	// holds its Lock.
	Root string
	// IdleTimeout: exit after this long without leases, requests or
	// work under way (0: never).
	IdleTimeout time.Duration
	Logger      *slog.Logger
}

// Serve answers the daemon's requests for b until ctx is done or it has
// been idle for opts.IdleTimeout; then it stops taking requests, removes
// its socket and closes b. When ctx is done it stops even while leases are
// held: a request that reaches it from then on is refused (503) as by a
// daemon going idle, never served on layers about to be unmounted.
func Serve(ctx context.Context, b Backend, opts ServeOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sock := SocketPath(opts.Root)
	os.Remove(sock) // a crashed daemon's; the caller holds the lock
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("node daemon: %w", err)
	}
	os.Chmod(sock, 0o600)
	os.WriteFile(pidPath(opts.Root), []byte(strconv.Itoa(os.Getpid())), 0o644)
	defer os.Remove(pidPath(opts.Root))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	d := &daemon{b: b, activity: make(chan struct{}, 1), unanswered: map[net.Conn]bool{}}
	srv := &http.Server{Handler: d.routes(), ConnState: d.connState}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("node daemon serving", "socket", sock)

	tick := time.NewTicker(idleTick)
	defer tick.Stop()
	idleSince := time.Now()
	for {
		select {
		case <-ctx.Done():
			// Stopped (SIGTERM): leases or not, no request is taken from
			// now on, as the layers are unmounted below.
			d.stop()
			log.Info("node daemon stopping")
		case err := <-errc:
			os.Remove(sock)
			b.Close(context.Background())
			return err
		case <-d.activity:
			idleSince = time.Now()
			continue
		case <-tick.C:
			b.ReapDead(ctx)
			if len(b.Leases()) > 0 || b.Busy() {
				idleSince = time.Now()
			}
			if opts.IdleTimeout <= 0 || time.Since(idleSince) < opts.IdleTimeout || !d.closeIdle(opts.Root) {
				continue
			}
			log.Info("node daemon idle, exiting")
		}
		break
	}
	// No connection may be dropped unanswered, or its client could not
	// tell whether its request was served. The socket goes first, so no
	// new client connects (and none finds the next daemon's socket
	// removed: that one waits for the lock); the connections queued on
	// it are accepted and refused (503), not reset by closing the
	// listener; once Serve has returned every accepted connection is
	// tracked, and the daemon waits until each is answered. (Not
	// srv.Shutdown: it hangs up on a request read after it began.)
	os.Remove(sock)
	drain(ln)
	ln.Close()
	<-errc
	for end := time.Now().Add(5 * time.Second); d.pending() && time.Now().Before(end); {
		time.Sleep(time.Millisecond)
	}
	srv.Close()
	b.Close(context.Background())
	return nil
}

// drain waits, for a second at most, until no connection is queued on ln
// (Serve accepts them meanwhile).
func drain(ln net.Listener) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	for range 1000 {
		queued := false
		rc.Control(func(fd uintptr) {
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(p, 0)
			queued = n > 0
		})
		if !queued {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// idleTick is how often the daemon looks whether it is idle.
var idleTick = time.Second

// daemon serves the requests of one Serve.
type daemon struct {
	b        Backend
	activity chan struct{}

	mu         sync.Mutex
	inflight   int               // requests being served: a long pull holds no lease yet
	closing    bool              // no new requests: the daemon is exiting
	unanswered map[net.Conn]bool // connections new or with a request under way
}

func (d *daemon) connState(c net.Conn, s http.ConnState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s == http.StateNew || s == http.StateActive {
		d.unanswered[c] = true
	} else {
		delete(d.unanswered, c)
	}
}

// pending reports whether a connection waits for an answer.
func (d *daemon) pending() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.unanswered) > 0
}

// close stops the daemon taking requests, unless one is being served or a
// lease was taken meanwhile; it reports whether it did.
func (d *daemon) close() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return true
	}
	if d.inflight > 0 || len(d.b.Leases()) > 0 {
		return false
	}
	d.closing = true
	return true
}

// stop stops the daemon taking requests, whatever is under way.
func (d *daemon) stop() {
	d.mu.Lock()
	d.closing = true
	d.mu.Unlock()
}

// closeIdle closes the daemon as close does, unless a client holds root's
// start lock: it is starting a daemon, perhaps this one, and has not had
// its answer yet.
func (d *daemon) closeIdle(root string) bool {
	f, err := os.OpenFile(startPath(root), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return false
	}
	defer f.Close() // and with it the lock
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return false
	}
	return d.close()
}

// begin admits a request, unless the daemon is exiting.
func (d *daemon) begin() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return false
	}
	d.inflight++
	return true
}

func (d *daemon) end() {
	d.mu.Lock()
	d.inflight--
	d.mu.Unlock()
}

func (d *daemon) routes() http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern string, fn func(r *http.Request) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			if !d.begin() {
				w.WriteHeader(http.StatusServiceUnavailable)
				json.NewEncoder(w).Encode(errorBody{Error: exiting})
				return
			}
			defer d.end()
			select {
			case d.activity <- struct{}{}:
			default:
			}
			v, err := fn(r)
			if err != nil {
				w.WriteHeader(http.StatusInternalServerError)
				json.NewEncoder(w).Encode(errorBody{Error: err.Error()})
				return
			}
			json.NewEncoder(w).Encode(v)
		})
	}
	b := d.b
	handle("POST /v1/pull", func(r *http.Request) (any, error) {
		var req PullRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			return nil, err
		}
		if err := allowPlain(b, req.Ref, req.PlainHTTP); err != nil {
			return nil, err
		}
		return b.Pull(r.Context(), req.Ref)
	})
	handle("POST /v1/leases", func(r *http.Request) (any, error) {
		var req AcquireRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			return nil, err
		}
		if err := allowPlain(b, req.Ref, req.PlainHTTP); err != nil {
			return nil, err
		}
		// A lease outlives the request: a client that gives up does not
		// cancel a mount half made.
		return b.Acquire(context.WithoutCancel(r.Context()), node.AcquireRequest{ID: req.ID, Ref: req.Ref, Union: req.Union, PID: req.PID})
	})
	handle("DELETE /v1/leases/{id}", func(r *http.Request) (any, error) {
		return struct{}{}, b.Release(r.Context(), r.PathValue("id"))
	})
	handle("GET /v1/leases", func(r *http.Request) (any, error) { return b.Leases(), nil })
	handle("POST /v1/unmount", func(r *http.Request) (any, error) {
		var req UnmountRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			return nil, err
		}
		id, ok := b.LeaseByUnion(req.Dir)
		if !ok {
			return nil, fmt.Errorf("%s is not a strata mount", req.Dir)
		}
		return struct{}{}, b.Release(r.Context(), id)
	})
	handle("GET /v1/images", func(r *http.Request) (any, error) { return b.Images() })
	handle("DELETE /v1/images", func(r *http.Request) (any, error) {
		return b.RemoveImage(r.Context(), r.URL.Query().Get("ref"))
	})
	handle("POST /v1/gc", func(r *http.Request) (any, error) { return b.GC(r.Context()) })
	handle("GET /v1/downloads", func(r *http.Request) (any, error) { return b.Downloads(), nil })
	handle("GET /v1/df", func(r *http.Request) (any, error) { return b.DF(), nil })
	return mux
}

// allowPlain marks the registry of ref as reached over plain HTTP when a
// request asks for it (the user's --plain-http).
func allowPlain(b Backend, ref string, plainHTTP bool) error {
	if !plainHTTP {
		return nil
	}
	r, err := remote.ParseReference(ref)
	if err != nil {
		return err
	}
	b.Hosts().AllowPlainHTTP(r.Registry)
	return nil
}
