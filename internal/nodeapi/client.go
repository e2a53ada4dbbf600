package nodeapi

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
	"syscall"
	"time"

	"github.com/strata-oci/strata/internal/node"
)

// Client talks to the node daemon of one root.
type Client struct {
	root  string
	start []string
	http  *http.Client
}

// startTimeout bounds how long a client waits for a daemon to answer once
// it is started (a daemon may first wait for an exiting one).
const startTimeout = 30 * time.Second

// Dial returns a client for the daemon of root, starting the daemon with
// start (a command line: the strata binary, its flags and `daemon`) if it
// is not running; nil start only connects. Clients that dial at once start
// one daemon between them.
func Dial(ctx context.Context, root string, start []string) (*Client, error) {
	sock := SocketPath(root)
	c := &Client{root: root, start: start, http: &http.Client{Transport: &http.Transport{
		// A connection per request: one kept from the last request
		// could be closed by a daemon going idle as this one is sent.
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}}
	if err := c.ensure(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// errNotReached: the request reached no daemon that serves it (no socket,
// connection refused, or a daemon exiting), so it may be sent again.
var errNotReached = errors.New("no node daemon")

func (c *Client) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return c.send(ctx, "GET", "/v1/leases", nil, nil)
}

// ensure makes sure a daemon answers: if none does, it starts one, under
// root's start lock so that concurrent clients start one daemon.
func (c *Client) ensure(ctx context.Context) error {
	if c.ping(ctx) == nil {
		return nil
	}
	if len(c.start) == 0 {
		return errors.New("the node daemon is not running")
	}
	if err := os.MkdirAll(c.root, 0o755); err != nil {
		return err
	}
	lock, err := flock(ctx, startPath(c.root), startTimeout)
	if err != nil {
		return fmt.Errorf("start node daemon: %w", err)
	}
	defer lock.Close()      // the daemon does not go idle while it is held
	if c.ping(ctx) == nil { // another client started it meanwhile
		return nil
	}
	logPath := filepath.Join(c.root, "daemon.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	if err := ctx.Err(); err != nil { // the client gave up: start no daemon
		return err
	}
	cmd := exec.Command(c.start[0], c.start[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start node daemon: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	// Poll often at first: a fresh daemon is usually up within tens of
	// milliseconds, and a container start waits for it.
	pause := 2 * time.Millisecond
	for {
		if c.ping(ctx) == nil {
			return nil
		}
		select {
		case err := <-exited:
			if err == nil {
				return fmt.Errorf("node daemon exited before it answered; see %s", logPath)
			}
			return fmt.Errorf("node daemon exited at start (%v); see %s", err, logPath)
		case <-deadline.C:
			return fmt.Errorf("node daemon did not start; see %s", logPath)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 50*time.Millisecond)
	}
}

// notReached reports whether a request failed before a daemon took it:
// the client could not connect, or the connection was reset before an
// answer. On a unix socket a reset means the daemon closed it without
// reading all of the request (it was still queued as the daemon went), and
// the daemon reads a whole request before it acts on it.
func notReached(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// do sends a request; one that reached no daemon that serves it is sent
// again to a daemon started anew.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	err := c.send(ctx, method, path, in, out)
	for try := 0; errors.Is(err, errNotReached) && try < 3; try++ {
		if err := c.ensure(ctx); err != nil {
			return err
		}
		err = c.send(ctx, method, path, in, out)
	}
	return err
}

func (c *Client) send(ctx context.Context, method, path string, in, out any) error {
	var body []byte
	if in != nil {
		body, _ = json.Marshal(in)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://strata"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if notReached(err) {
			return fmt.Errorf("%w: %v", errNotReached, err)
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e errorBody
		json.NewDecoder(resp.Body).Decode(&e)
		if e.Error == "" {
			e.Error = resp.Status
		}
		if resp.StatusCode == http.StatusServiceUnavailable && e.Error == exiting {
			return fmt.Errorf("%w: %s", errNotReached, e.Error)
		}
		return errors.New(e.Error)
	}
	if out != nil {
		return json.NewDecoder(resp.Body).Decode(out)
	}
	return nil
}

// Pull pulls an image.
func (c *Client) Pull(ctx context.Context, req PullRequest) (*node.Image, error) {
	var img node.Image
	return &img, c.do(ctx, "POST", "/v1/pull", req, &img)
}

// Acquire takes a lease on an image's layers, pulling it if needed.
func (c *Client) Acquire(ctx context.Context, req AcquireRequest) (*node.Lease, error) {
	var l node.Lease
	return &l, c.do(ctx, "POST", "/v1/leases", req, &l)
}

// Release ends lease id.
func (c *Client) Release(ctx context.Context, id string) error {
	return c.do(ctx, "DELETE", "/v1/leases/"+url.PathEscape(id), nil, nil)
}

// Unmount ends the union mount at dir.
func (c *Client) Unmount(ctx context.Context, req UnmountRequest) error {
	return c.do(ctx, "POST", "/v1/unmount", req, nil)
}

// Leases lists leases.
func (c *Client) Leases(ctx context.Context) ([]*node.Lease, error) {
	var out []*node.Lease
	return out, c.do(ctx, "GET", "/v1/leases", nil, &out)
}

// Images lists pulled images.
func (c *Client) Images(ctx context.Context) ([]*node.Image, error) {
	var out []*node.Image
	return out, c.do(ctx, "GET", "/v1/images", nil, &out)
}

// RemoveImage forgets a pulled image and frees what only it used.
func (c *Client) RemoveImage(ctx context.Context, ref string) (*node.GCReport, error) {
	var r node.GCReport
	return &r, c.do(ctx, "DELETE", "/v1/images?ref="+url.QueryEscape(ref), nil, &r)
}

// GC removes the layers and cache items no image or container uses.
func (c *Client) GC(ctx context.Context) (*node.GCReport, error) {
	var r node.GCReport
	return &r, c.do(ctx, "POST", "/v1/gc", nil, &r)
}

// DF reports layer and cache use.
func (c *Client) DF(ctx context.Context) (*node.DFReport, error) {
	var r node.DFReport
	return &r, c.do(ctx, "GET", "/v1/df", nil, &r)
}

// Downloads reports the fallback downloads in progress.
func (c *Client) Downloads(ctx context.Context) ([]node.Download, error) {
	var out []node.Download
	return out, c.do(ctx, "GET", "/v1/downloads", nil, &out)
}
