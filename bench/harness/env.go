package harness

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/bench/link"
	"github.com/strata-oci/strata/internal/testimage"
)

// distributionModule is the CNCF distribution registry, the registry
// without layer mounts (the same one the integration tests use).
const distributionModule = "github.com/distribution/distribution/v3/cmd/registry@v3.0.0"

// env is what every benchmark of a run shares: the node's disk, the
// binaries, the emulated link and the registries behind it.
type env struct {
	cfg  Config
	work string
	// disk is the node's disk: an ext4 file system of its own (a loop
	// device), so that its use can be sampled with statfs and nothing
	// else writes to it. diskDev is its block device.
	disk    string
	diskDev string

	strata string // binary
	dist   string // CNCF registry binary
	stargz string // the stargz-snapshotter peer (bench/stargz)

	net         *link.Net
	metrics     *http.Client // reaches strata's registry around the proxy
	strataProxy *link.Proxy  // node side of the link to strata's registry
	distProxy   *link.Proxy  // … and to the CNCF registry
	// mirrorProxy is the node side of the link to strata's mirror (port
	// 5002 in the registries' namespace, up for the mirror systems'
	// samples); upstreamProxy, inside that namespace, is the mirror's own
	// link to the CNCF registry, its upstream.
	mirrorProxy, upstreamProxy *link.Proxy

	mu       sync.Mutex
	cleanups []func(context.Context) error
	log      io.Writer
}

func (e *env) logf(format string, a ...any) {
	fmt.Fprintf(e.log, "bench: "+format+"\n", a...)
}

// defer registers f to run at teardown, in reverse order.
func (e *env) onClose(f func(context.Context) error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, f)
}

// Close tears everything down, whatever failed before.
func (e *env) Close(ctx context.Context) error {
	e.mu.Lock()
	cl := e.cleanups
	e.cleanups = nil
	e.mu.Unlock()
	var errs []error
	for i := len(cl) - 1; i >= 0; i-- {
		if err := cl[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// setup prepares the work directory, the node disk, the binaries, the link
// and the registries.
func setup(ctx context.Context, cfg Config) (_ *env, err error) {
	e := &env{cfg: cfg, log: cfg.Log}
	defer func() {
		if err != nil {
			e.Close(context.WithoutCancel(ctx))
		}
	}()
	link.CleanStale(ctx)
	if e.work, err = os.MkdirTemp(cfg.WorkParent, "strata-bench-"); err != nil {
		return nil, err
	}
	e.onClose(func(context.Context) error {
		if cfg.Keep {
			e.logf("kept %s", e.work)
			return nil
		}
		return os.RemoveAll(e.work)
	})
	if err := e.mountDisk(ctx); err != nil {
		return nil, err
	}
	if err := e.build(ctx, cfg.needDist()); err != nil {
		return nil, err
	}
	if cfg.wantsStargz() {
		if err := e.buildStargz(ctx); err != nil {
			return nil, err
		}
	}
	if e.net, err = link.New(ctx, 0); err != nil {
		return nil, fmt.Errorf("emulated link: %w", err)
	}
	e.onClose(func(ctx context.Context) error { return e.net.Close(ctx) })
	if err := e.startRegistries(ctx); err != nil {
		return nil, err
	}
	return e, nil
}

// mountDisk makes the node's disk: a sparse ext4 image on a loop device.
func (e *env) mountDisk(ctx context.Context) error {
	img := filepath.Join(e.work, "node-disk.img")
	e.disk = filepath.Join(e.work, "node")
	if err := os.MkdirAll(e.disk, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(img, 32<<30); err != nil {
		return err
	}
	if err := run(ctx, "mkfs.ext4", "-q", "-F", "-N", "400000", "-E", "lazy_itable_init=0,lazy_journal_init=0", img); err != nil {
		return err
	}
	if err := run(ctx, "mount", "-o", "loop", img, e.disk); err != nil {
		return err
	}
	e.onClose(func(ctx context.Context) error {
		// Whatever is mounted below the disk (FUSE layers, unions) goes first.
		umountBelow(e.disk)
		return run(ctx, "umount", e.disk)
	})
	out, err := exec.CommandContext(ctx, "findmnt", "-n", "-o", "SOURCE", e.disk).Output()
	if err == nil {
		e.diskDev = strings.TrimSpace(string(out))
	}
	return nil
}

// diskUsed is the bytes used on the node's disk.
func (e *env) diskUsed() int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(e.disk, &st); err != nil {
		return 0
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// build compiles strata from this tree and the CNCF registry from the Go
// module proxy (cached beside the test images).
func (e *env) build(ctx context.Context, dist bool) error {
	bin := filepath.Join(e.work, "bin")
	e.strata = filepath.Join(bin, "strata")
	e.logf("building strata")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", e.strata, "./cmd/strata")
	cmd.Dir = e.cfg.Repo
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/strata: %w\n%s", err, out)
	}
	if !dist {
		return nil
	}
	distDir := filepath.Join(testimage.DefaultCacheDir, "bin", "distribution-v3.0.0")
	e.dist = filepath.Join(distDir, "registry")
	if _, err := os.Stat(e.dist); err == nil {
		return nil
	}
	e.logf("building the CNCF distribution registry (%s)", distributionModule)
	if err := os.MkdirAll(distDir, 0o755); err != nil {
		return err
	}
	cmd = exec.CommandContext(ctx, "go", "install", distributionModule)
	cmd.Dir = distDir
	cmd.Env = append(os.Environ(), "GOBIN="+distDir, "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go install %s: %w\n%s", distributionModule, err, out)
	}
	return nil
}

// startRegistries runs strata's registry and the CNCF one inside the
// registry namespace, and a proxy to each on the node side.
func (e *env) startRegistries(ctx context.Context) error {
	ip := e.net.RegistryIP
	regLog := filepath.Join(e.work, "registry.log")
	if err := e.spawn(regLog, "nsenter", "--net="+e.net.RegistryNS(), e.strata, "--log-level", "warn",
		"registry", "serve", "--addr", ip+":5000", "--root", filepath.Join(e.work, "registry")); err != nil {
		return err
	}
	var err error
	if e.strataProxy, err = link.NewProxy(ip+":5000", e.net.NodeNS()); err != nil {
		return err
	}
	e.onClose(func(context.Context) error { return e.strataProxy.Close() })
	if err := waitHTTP(ctx, "http://"+e.strataProxy.Addr()+"/v2/", 20*time.Second); err != nil {
		b, _ := os.ReadFile(regLog)
		return fmt.Errorf("strata registry: %w\n%s", err, b)
	}
	if e.dist == "" {
		return nil
	}
	distCfg := filepath.Join(e.work, "distribution.yml")
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s:5001\n",
		filepath.Join(e.work, "distribution"), ip)
	if err := os.WriteFile(distCfg, []byte(cfg), 0o644); err != nil {
		return err
	}
	if err := e.spawn(filepath.Join(e.work, "distribution.log"), "nsenter", "--net="+e.net.RegistryNS(), e.dist, "serve", distCfg); err != nil {
		return err
	}
	if e.distProxy, err = link.NewProxy(ip+":5001", e.net.NodeNS()); err != nil {
		return err
	}
	e.onClose(func(context.Context) error { return e.distProxy.Close() })
	if err := waitHTTP(ctx, "http://"+e.distProxy.Addr()+"/v2/", 20*time.Second); err != nil {
		b, _ := os.ReadFile(filepath.Join(e.work, "distribution.log"))
		return fmt.Errorf("CNCF registry: %w\n%s", err, b)
	}
	if !e.cfg.wantsMirror() {
		return nil
	}
	if e.mirrorProxy, err = link.NewProxy(ip+":5002", e.net.NodeNS()); err != nil {
		return err
	}
	e.onClose(func(context.Context) error { return e.mirrorProxy.Close() })
	if e.upstreamProxy, err = link.NewProxyIn(e.net.RegistryNS(), ip+":5001", e.net.RegistryNS()); err != nil {
		return err
	}
	e.onClose(func(context.Context) error { return e.upstreamProxy.Close() })
	return nil
}

// spawn starts a long-running process, stopped at teardown.
func (e *env) spawn(logFile string, name string, args ...string) error {
	f, err := os.Create(logFile)
	if err != nil {
		return err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", name, err)
	}
	e.onClose(func(context.Context) error {
		defer f.Close()
		return stop(cmd, 10*time.Second)
	})
	return nil
}

// stop interrupts cmd and kills it if it has not exited after grace.
func stop(cmd *exec.Cmd, grace time.Duration) error {
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		cmd.Process.Kill()
		<-done
	}
	return nil
}

// push copies an OCI layout into a registry with skopeo.
func (e *env) push(ctx context.Context, layout, ref string) error {
	return run(ctx, "skopeo", "copy", "-q", "--dest-tls-verify=false", "oci:"+layout+":latest", "docker://"+ref)
}

// awaitExpansion asks strata's registry for a layer mount of every layer of
// the image until each is expanded, and returns the total sizes of the
// expansions' index and data blobs.
func (e *env) awaitExpansion(ctx context.Context, repo string, layers []digest.Digest) (index, data int64, err error) {
	deadline := time.Now().Add(5 * time.Minute)
	for _, l := range layers {
		for {
			resp, err := http.Post("http://"+e.strataProxy.Addr()+api.MountPath(repo, l), "application/json", nil)
			if err != nil {
				return 0, 0, err
			}
			var md api.MountDescriptor
			if resp.StatusCode == http.StatusOK {
				err = json.NewDecoder(resp.Body).Decode(&md)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				if err != nil {
					return 0, 0, fmt.Errorf("mount descriptor of %s: %w", l, err)
				}
				index += md.Index.Size
				data += md.Data.Size
				break
			}
			if resp.StatusCode != http.StatusAccepted {
				return 0, 0, fmt.Errorf("layer mount of %s: %s", l, resp.Status)
			}
			if time.Now().After(deadline) {
				return 0, 0, fmt.Errorf("layer %s not expanded after 5 minutes", l)
			}
			select {
			case <-ctx.Done():
				return 0, 0, ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	return index, data, nil
}

// shape sets the link to profile p.
func (e *env) shape(ctx context.Context, p link.Profile) error {
	rtt := time.Duration(p.RTTMillis * float64(time.Millisecond))
	e.strataProxy.SetRTT(rtt)
	if e.distProxy != nil {
		e.distProxy.SetRTT(rtt)
	}
	if e.mirrorProxy != nil {
		// The mirror is as far from the node as the registries are, and
		// its upstream as far from it again, over a link of the same rate.
		e.mirrorProxy.SetRTT(rtt)
		e.upstreamProxy.SetRTT(rtt)
		e.upstreamProxy.SetRate(p.RateBits)
	}
	return e.net.Shape(ctx, p.RateBits)
}

// linkBytes is what both proxies delivered to the node so far.
func (e *env) linkBytes() int64 {
	_, n, _ := e.strataProxy.Bytes()
	for _, p := range []*link.Proxy{e.distProxy, e.mirrorProxy} {
		if p != nil {
			_, m, _ := p.Bytes()
			n += m
		}
	}
	return n
}

// linkConns is the number of connections both proxies accepted so far.
func (e *env) linkConns() int64 {
	_, _, n := e.strataProxy.Bytes()
	for _, p := range []*link.Proxy{e.distProxy, e.mirrorProxy} {
		if p != nil {
			_, _, m := p.Bytes()
			n += m
		}
	}
	return n
}

// registryRequests scrapes strata's registry for the requests it served so
// far, by route. It reaches the registry from inside the node namespace,
// around the proxy, so that the scrape does not count as link traffic.
func (e *env) registryRequests(ctx context.Context) map[string]int64 {
	if e.metrics == nil {
		e.metrics = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return link.DialIn(ctx, e.net.NodeNS(), addr)
			},
		}}
	}
	resp, err := e.metrics.Get("http://" + e.net.RegistryIP + ":5000/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil
	}
	out := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "strata_registry_requests_total{")
		if !ok {
			continue
		}
		labels, val, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		route := ""
		for _, kv := range strings.Split(labels, ",") {
			if v, ok := strings.CutPrefix(kv, "route="); ok {
				route = strings.Trim(v, `"`)
			}
		}
		f, _ := strconv.ParseFloat(strings.TrimSpace(val), 64)
		out[route] += int64(f)
	}
	return out
}

func (e *env) vethBytes(ctx context.Context) int64 {
	rx, _, err := e.net.Counters(ctx)
	if err != nil {
		return 0
	}
	return rx
}

func waitHTTP(ctx context.Context, url string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode < 500 {
				return nil
			}
			err = errors.New(resp.Status)
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// run runs a command, returning its output in the error.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tailString(string(out), 3000))
	}
	return nil
}

func tailString(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// umountBelow lazily unmounts every mount under dir, deepest first.
func umountBelow(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mounts []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			mounts = append(mounts, f[4])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		syscall.Unmount(mounts[i], syscall.MNT_DETACH)
	}
}
