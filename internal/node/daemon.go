package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/strata-oci/strata/internal/remote"
)

// The node daemon owns the layer mounts: FUSE servers live in one process,
// shared by every union and container of the node. CLI commands talk to it
// over <root>/strata.sock (HTTP with JSON bodies) and start it when it is
// not running. It exits after IdleTimeout with no leases.

// SocketPath is the daemon's socket under root.
func SocketPath(root string) string { return filepath.Join(root, "strata.sock") }

// ServeOptions configure the daemon.
type ServeOptions struct {
	// IdleTimeout: exit after this long without leases (0: never).
	IdleTimeout time.Duration
}

type acquireRequest struct {
	ID        string `json:"id"`
	Ref       string `json:"ref"`
	PlainHTTP bool   `json:"plainHTTP"`
	Union     string `json:"union,omitempty"`
	PID       int    `json:"pid,omitempty"`
}

type pullRequest struct {
	Ref       string `json:"ref"`
	PlainHTTP bool   `json:"plainHTTP"`
}

type apiError struct {
	Error string `json:"error"`
}

// Serve runs the daemon on m until ctx is done or it has been idle for
// opts.IdleTimeout.
func Serve(ctx context.Context, m *Manager, opts ServeOptions) error {
	sock := SocketPath(m.root)
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("node daemon: %w", err)
	}
	os.Chmod(sock, 0o600)
	os.WriteFile(filepath.Join(m.root, "daemon.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644)
	defer os.Remove(filepath.Join(m.root, "daemon.pid"))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	activity := make(chan struct{}, 1)
	// inflight counts requests being served: a long pull holds no lease
	// yet, and must not let the daemon exit as idle under it.
	var inflight atomic.Int64
	mux := http.NewServeMux()
	handle := func(pattern string, fn func(r *http.Request) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			select {
			case activity <- struct{}{}:
			default:
			}
			inflight.Add(1)
			defer inflight.Add(-1)
			v, err := fn(r)
			w.Header().Set("Content-Type", "application/json")
			if err != nil {
				w.WriteHeader(http.StatusInternalServerError)
				json.NewEncoder(w).Encode(apiError{Error: err.Error()})
				return
			}
			json.NewEncoder(w).Encode(v)
		})
	}
	handle("POST /v1/pull", func(r *http.Request) (any, error) {
		var req pullRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			return nil, err
		}
		if err := allowPlain(m, req.Ref, req.PlainHTTP); err != nil {
			return nil, err
		}
		return m.Pull(r.Context(), req.Ref)
	})
	handle("POST /v1/leases", func(r *http.Request) (any, error) {
		var req acquireRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			return nil, err
		}
		if err := allowPlain(m, req.Ref, req.PlainHTTP); err != nil {
			return nil, err
		}
		return m.Acquire(context.WithoutCancel(r.Context()), AcquireRequest{ID: req.ID, Ref: req.Ref, Union: req.Union, PID: req.PID})
	})
	handle("DELETE /v1/leases/{id}", func(r *http.Request) (any, error) {
		return struct{}{}, m.Release(r.Context(), r.PathValue("id"))
	})
	handle("GET /v1/leases", func(r *http.Request) (any, error) { return m.Leases(), nil })
	handle("POST /v1/unmount", func(r *http.Request) (any, error) {
		var req struct{ Dir string }
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			return nil, err
		}
		id, ok := m.LeaseByUnion(req.Dir)
		if !ok {
			return nil, fmt.Errorf("%s is not a strata mount", req.Dir)
		}
		return struct{}{}, m.Release(r.Context(), id)
	})
	handle("GET /v1/images", func(r *http.Request) (any, error) { return m.Images() })
	handle("DELETE /v1/images", func(r *http.Request) (any, error) {
		return struct{}{}, m.RemoveImage(r.Context(), r.URL.Query().Get("ref"))
	})
	handle("GET /v1/downloads", func(r *http.Request) (any, error) { return m.Downloads(), nil })
	handle("GET /v1/df", func(r *http.Request) (any, error) { return m.DF(), nil })

	srv := &http.Server{Handler: mux}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	m.log.Info("node daemon serving", "socket", sock)

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	idleSince := time.Now()
	for {
		select {
		case <-ctx.Done():
		case err := <-errc:
			m.Close(context.Background())
			return err
		case <-activity:
			idleSince = time.Now()
			continue
		case <-tick.C:
			m.ReapDead(ctx)
			if len(m.Leases()) > 0 || inflight.Load() > 0 || m.completing() {
				idleSince = time.Now()
			}
			if opts.IdleTimeout <= 0 || time.Since(idleSince) < opts.IdleTimeout {
				continue
			}
			m.log.Info("node daemon idle, exiting")
		}
		break
	}
	sctx, c := context.WithTimeout(context.Background(), 5*time.Second)
	defer c()
	srv.Shutdown(sctx)
	os.Remove(sock)
	m.Close(context.Background())
	return nil
}

// allowPlain marks the registry of ref as reached over plain HTTP when a
// request asks for it (the user's --plain-http).
func allowPlain(m *Manager, ref string, plainHTTP bool) error {
	if !plainHTTP {
		return nil
	}
	r, err := remote.ParseReference(ref)
	if err != nil {
		return err
	}
	m.client.Hosts().AllowPlainHTTP(r.Registry)
	return nil
}

// Client talks to the node daemon.
type Client struct {
	root string
	http *http.Client
}

// Dial returns a client for the daemon of root, starting the daemon with
// start (a command line: the strata binary and its global flags) if it is
// not running.
func Dial(ctx context.Context, root string, start []string) (*Client, error) {
	sock := SocketPath(root)
	c := &Client{root: root, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}}
	if c.ping(ctx) == nil {
		return c, nil
	}
	if len(start) == 0 {
		return nil, errors.New("the node daemon is not running")
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(root, "daemon.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(start[0], start[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start node daemon: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(20 * time.Second)
	// Poll often at first: a fresh daemon is usually up within tens of
	// milliseconds, and a container start waits for it.
	pause := 2 * time.Millisecond
	for {
		if c.ping(ctx) == nil {
			return c, nil
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("node daemon exited at start (%v); see %s", err, filepath.Join(root, "daemon.log"))
		case <-deadline:
			return nil, fmt.Errorf("node daemon did not start; see %s", filepath.Join(root, "daemon.log"))
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 50*time.Millisecond)
	}
}

func (c *Client) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return c.do(ctx, "GET", "/v1/leases", nil, nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var req *http.Request
	var err error
	if in != nil {
		b, _ := json.Marshal(in)
		req, err = http.NewRequestWithContext(ctx, method, "http://strata"+path, bytes.NewReader(b))
	} else {
		req, err = http.NewRequestWithContext(ctx, method, "http://strata"+path, nil)
	}
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e apiError
		json.NewDecoder(resp.Body).Decode(&e)
		if e.Error == "" {
			e.Error = resp.Status
		}
		return errors.New(e.Error)
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

// Pull pulls ref.
func (c *Client) Pull(ctx context.Context, ref string, plainHTTP bool) (*Image, error) {
	var img Image
	return &img, c.do(ctx, "POST", "/v1/pull", pullRequest{Ref: ref, PlainHTTP: plainHTTP}, &img)
}

// Acquire mounts ref's layers for lease id (and a read-only union at union
// if set). pid, if set, ends the lease when that process exits.
func (c *Client) Acquire(ctx context.Context, id, ref string, plainHTTP bool, union string, pid int) (*Lease, error) {
	var l Lease
	return &l, c.do(ctx, "POST", "/v1/leases", acquireRequest{ID: id, Ref: ref, PlainHTTP: plainHTTP, Union: union, PID: pid}, &l)
}

// Release ends lease id.
func (c *Client) Release(ctx context.Context, id string) error {
	return c.do(ctx, "DELETE", "/v1/leases/"+id, nil, nil)
}

// Unmount ends the union mount at dir.
func (c *Client) Unmount(ctx context.Context, dir string) error {
	return c.do(ctx, "POST", "/v1/unmount", struct{ Dir string }{dir}, nil)
}

// Leases lists leases.
func (c *Client) Leases(ctx context.Context) ([]*Lease, error) {
	var out []*Lease
	return out, c.do(ctx, "GET", "/v1/leases", nil, &out)
}

// Images lists pulled images.
func (c *Client) Images(ctx context.Context) ([]*Image, error) {
	var out []*Image
	return out, c.do(ctx, "GET", "/v1/images", nil, &out)
}

// RemoveImage forgets a pulled image.
func (c *Client) RemoveImage(ctx context.Context, ref string) error {
	return c.do(ctx, "DELETE", "/v1/images?ref="+url.QueryEscape(ref), nil, nil)
}

// DF reports layer and cache use.
func (c *Client) DF(ctx context.Context) (*DFReport, error) {
	var r DFReport
	return &r, c.do(ctx, "GET", "/v1/df", nil, &r)
}

// Downloads reports fallback downloads in progress.
func (c *Client) Downloads(ctx context.Context) ([]Download, error) {
	var out []Download
	return out, c.do(ctx, "GET", "/v1/downloads", nil, &out)
}
