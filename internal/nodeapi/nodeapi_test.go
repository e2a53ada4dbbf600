package nodeapi_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/nodeapi"
	"github.com/strata-oci/strata/internal/remote"
)

// The test binary is also the daemon these tests start: with
// STRATA_NODEAPI_DAEMON=ROOT it serves a fakeBackend on ROOT, as `strata
// daemon` serves a node.Manager, recording its PID in ROOT/served.
const daemonEnv = "STRATA_NODEAPI_DAEMON"

func TestMain(m *testing.M) {
	if root := os.Getenv(daemonEnv); root != "" {
		os.Exit(runDaemon(root))
	}
	os.Exit(m.Run())
}

func runDaemon(root string) int {
	ctx := context.Background()
	unlock, err := nodeapi.Lock(ctx, root, time.Minute)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer unlock()
	f, err := os.OpenFile(filepath.Join(root, "served"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 1
	}
	fmt.Fprintln(f, os.Getpid())
	f.Close()
	idle, _ := time.ParseDuration(os.Getenv("STRATA_NODEAPI_IDLE"))
	nodeapi.SetIdleTick(10 * time.Millisecond) // idle exits within the tests' time
	if err := nodeapi.Serve(ctx, &fakeBackend{hosts: &remote.Hosts{}}, nodeapi.ServeOptions{Root: root, IdleTimeout: idle}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// fakeBackend answers as a node would, from memory.
type fakeBackend struct {
	hosts  *remote.Hosts
	mu     sync.Mutex
	leases map[string]*node.Lease
}

func (b *fakeBackend) Pull(ctx context.Context, ref string) (*node.Image, error) {
	if strings.Contains(ref, "missing") {
		return nil, fmt.Errorf("resolve %s: not found", ref)
	}
	r, err := remote.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	return &node.Image{Ref: ref, Registry: r.Registry, Mode: node.ModeLazy, PlainHTTP: b.hosts.Lookup(r.Registry).PlainHTTP}, nil
}

func (b *fakeBackend) Acquire(ctx context.Context, req node.AcquireRequest) (*node.Lease, error) {
	img, err := b.Pull(ctx, req.Ref)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.leases == nil {
		b.leases = map[string]*node.Lease{}
	}
	if b.leases[req.ID] != nil {
		return nil, fmt.Errorf("lease %s exists", req.ID)
	}
	l := &node.Lease{ID: req.ID, Ref: req.Ref, Image: img, Union: req.Union, PID: req.PID, Lowers: []string{"/l1", "/l0"}}
	b.leases[req.ID] = l
	return l, nil
}

func (b *fakeBackend) Release(ctx context.Context, id string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.leases[id] == nil {
		return fmt.Errorf("no lease %s", id)
	}
	delete(b.leases, id)
	return nil
}

func (b *fakeBackend) Leases() []*node.Lease {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []*node.Lease
	for _, l := range b.leases {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (b *fakeBackend) LeaseByUnion(dir string) (string, bool) {
	for _, l := range b.Leases() {
		if l.Union == dir {
			return l.ID, true
		}
	}
	return "", false
}

func (b *fakeBackend) Images() ([]*node.Image, error) { return nil, nil }
func (b *fakeBackend) RemoveImage(ctx context.Context, ref string) (*node.GCReport, error) {
	return &node.GCReport{}, nil
}
func (b *fakeBackend) GC(ctx context.Context) (*node.GCReport, error) { return &node.GCReport{}, nil }
func (b *fakeBackend) Downloads() []node.Download                     { return nil }
func (b *fakeBackend) DF() *node.DFReport                             { return &node.DFReport{CacheLimit: 42} }
func (b *fakeBackend) ReapDead(ctx context.Context)                   {}
func (b *fakeBackend) Busy() bool                                     { return false }
func (b *fakeBackend) Hosts() *remote.Hosts                           { return b.hosts }
func (b *fakeBackend) Close(ctx context.Context)                      {}

// startArgs is how a client starts the test daemon.
func startArgs(t *testing.T, idle time.Duration) []string {
	t.Setenv("STRATA_NODEAPI_IDLE", idle.String())
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return []string{exe, "-test.run=^$"}
}

// served returns the PIDs of the daemons that served root.
func served(t *testing.T, root string) []string {
	b, _ := os.ReadFile(filepath.Join(root, "served"))
	return strings.Fields(string(b))
}

func TestRequests(t *testing.T) {
	root := t.TempDir()
	t.Setenv(daemonEnv, root)
	ctx := context.Background()
	if _, err := nodeapi.Dial(ctx, root, nil); err == nil {
		t.Fatal("Dial without a start command connected to no daemon")
	}
	c, err := nodeapi.Dial(ctx, root, startArgs(t, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopDaemon(t, root) })
	img, err := c.Pull(ctx, nodeapi.PullRequest{Ref: "127.0.0.1:5000/app:v1", PlainHTTP: true})
	if err != nil || img.Ref != "127.0.0.1:5000/app:v1" || !img.PlainHTTP {
		t.Fatalf("pull: %+v, %v; want the image, reached over plain HTTP", img, err)
	}
	dir := t.TempDir()
	l, err := c.Acquire(ctx, nodeapi.AcquireRequest{ID: "mount:" + dir, Ref: "r.example/app:v1", Union: dir, PID: 7})
	if err != nil || l.ID != "mount:"+dir || l.Union != dir || l.PID != 7 || len(l.Lowers) != 2 || l.Image.PlainHTTP {
		t.Fatalf("acquire: %+v, %v", l, err)
	}
	if _, err := c.Acquire(ctx, nodeapi.AcquireRequest{ID: "container:x", Ref: "r.example/missing:v1"}); err == nil || err.Error() != "resolve r.example/missing:v1: not found" {
		t.Errorf("acquire of a missing image: %v, want the backend's error as it is", err)
	}
	if ls, err := c.Leases(ctx); err != nil || len(ls) != 1 {
		t.Errorf("leases: %v, %v", ls, err)
	}
	if r, err := c.DF(ctx); err != nil || r.CacheLimit != 42 {
		t.Errorf("df: %+v, %v", r, err)
	}
	if err := c.Unmount(ctx, nodeapi.UnmountRequest{Dir: "/not/mounted"}); err == nil || !strings.Contains(err.Error(), "is not a strata mount") {
		t.Errorf("unmount of a directory not mounted: %v", err)
	}
	if err := c.Unmount(ctx, nodeapi.UnmountRequest{Dir: dir}); err != nil {
		t.Errorf("unmount: %v", err)
	}
	if err := c.Release(ctx, "container:none"); err == nil {
		t.Error("released a lease that does not exist")
	}
}

// TestDialDone: a client whose context is done starts no daemon.
func TestDialDone(t *testing.T) {
	root := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// A start command that cannot run: starting it would fail otherwise.
	start := []string{filepath.Join(t.TempDir(), "strata")}
	if _, err := nodeapi.Dial(ctx, root, start); !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial with a done context: %v, want %v", err, context.Canceled)
	}
}

// TestStartOnce starts many clients at once on a fresh root, round after
// round: one daemon starts, and every client connects to it.
func TestStartOnce(t *testing.T) {
	const rounds, clients = 10, 20
	for round := range rounds {
		root := t.TempDir()
		t.Setenv(daemonEnv, root)
		start := startArgs(t, time.Minute)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		var wg sync.WaitGroup
		errs := make([]error, clients)
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := nodeapi.Dial(ctx, root, start)
				if err == nil {
					_, err = c.Acquire(ctx, nodeapi.AcquireRequest{ID: "container:" + strconv.Itoa(i), Ref: "r.example/app:v1"})
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		cancel()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if pids := served(t, root); len(pids) != 1 {
			t.Fatalf("round %d: %d daemons served (%v), want 1", round, len(pids), pids)
		}
		stopDaemon(t, root)
	}
}

// TestIdleExitRace: clients keep arriving at a daemon that goes idle
// between their requests; each request is served, by the daemon that was
// there or by one started anew. The requests are POSTs and DELETEs, which
// an HTTP client does not send again by itself.
func TestIdleExitRace(t *testing.T) {
	root := t.TempDir()
	t.Setenv(daemonEnv, root)
	start := startArgs(t, time.Nanosecond) // idle at any tick with no request and no lease
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	end := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; time.Now().Before(end); n++ {
				c, err := nodeapi.Dial(ctx, root, start)
				if err == nil {
					id := fmt.Sprintf("container:%d-%d", i, n)
					if _, err = c.Acquire(ctx, nodeapi.AcquireRequest{ID: id, Ref: "r.example/app:v1"}); err == nil {
						err = c.Release(ctx, id)
					}
				}
				if err != nil {
					errs[i] = err
					return
				}
				time.Sleep(time.Duration(i+1) * 5 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if pids := served(t, root); len(pids) < 2 {
		t.Errorf("%d daemons served: the daemon never went idle under the clients", len(pids))
	}
	stopDaemon(t, root)
}

// stopDaemon ends the daemon of root, if one runs, and waits for it.
func stopDaemon(t *testing.T, root string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "daemon.pid"))
	if err != nil {
		return
	}
	pid, _ := strconv.Atoi(string(b))
	p, err := os.FindProcess(pid)
	if err != nil {
		return
	}
	p.Signal(os.Interrupt)
	// The daemon holds its lock until it has exited.
	unlock, err := nodeapi.Lock(context.Background(), root, 10*time.Second)
	if err != nil {
		t.Fatalf("the daemon did not exit: %v", err)
	}
	unlock()
}

// TestStopRefusesLateRequests: a daemon stopped (SIGTERM) while leases are
// held takes no request from then on: one that reaches it as it stops is
// answered as by a daemon exiting (503), not served on layers about to be
// unmounted.
func TestStopRefusesLateRequests(t *testing.T) {
	root := t.TempDir()
	b := &fakeBackend{hosts: &remote.Hosts{}}
	if _, err := b.Acquire(context.Background(), node.AcquireRequest{ID: "container:held", Ref: "r.example/app:v1"}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- nodeapi.Serve(ctx, b, nodeapi.ServeOptions{Root: root}) }()
	sock := nodeapi.SocketPath(root)
	var conn net.Conn
	for end := time.Now().Add(10 * time.Second); ; {
		var err error
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("the daemon did not listen: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	defer conn.Close()

	cancel()
	// The daemon removes its socket once it takes no more requests.
	for end := time.Now().Add(10 * time.Second); ; {
		if _, err := os.Stat(sock); errors.Is(err, fs.ErrNotExist) {
			break
		}
		if time.Now().After(end) {
			t.Fatal("the daemon did not remove its socket")
		}
		time.Sleep(time.Millisecond)
	}
	req := `{"id":"container:late","ref":"r.example/app:v1"}`
	fmt.Fprintf(conn, "POST /v1/leases HTTP/1.1\r\nHost: strata\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(req), req)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("the late request was not answered: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "the node daemon is exiting") {
		t.Errorf("late request: %s %s, want 503, the node daemon is exiting", resp.Status, body)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if ls := b.Leases(); len(ls) != 1 || ls[0].ID != "container:held" {
		t.Errorf("leases after stop: %v, want only the one held before", ls)
	}
}
