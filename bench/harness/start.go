package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/bench/report"
	"github.com/strata-oci/strata/internal/nodeapi"
)

// sampleTimeout bounds one measured start, however slow the link.
const sampleTimeout = 5 * time.Minute

// measure runs one sample: prepare, then the timed commands, with the
// node disk and the link watched.
type measured struct {
	e       *env
	start   time.Time
	disk0   int64
	link0   int64
	veth0   int64
	conns0  int64
	req0    map[string]int64
	peak    int64
	stopped chan struct{}
	done    chan struct{}
}

func (e *env) begin(ctx context.Context) *measured {
	m := &measured{e: e, disk0: e.diskUsed(), link0: e.linkBytes(), veth0: e.vethBytes(ctx), conns0: e.linkConns(),
		req0: e.registryRequests(ctx), stopped: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if u := e.diskUsed() - m.disk0; u > m.peak {
				m.peak = u
			}
			select {
			case <-m.stopped:
				return
			case <-t.C:
			}
		}
	}()
	m.start = time.Now()
	return m
}

// end stops watching and fills the byte counts of s.
func (m *measured) end(ctx context.Context, s *report.Sample) {
	close(m.stopped)
	<-m.done
	if u := m.e.diskUsed() - m.disk0; u > m.peak {
		m.peak = u
	}
	s.PeakDiskBytes = m.peak
	s.LinkBytes = m.e.linkBytes() - m.link0
	s.VethBytes = m.e.vethBytes(ctx) - m.veth0
	s.Conns = m.e.linkConns() - m.conns0
	if req := m.e.registryRequests(ctx); req != nil && m.req0 != nil {
		for route, n := range req {
			if route != "metrics" { // the harness's own scrapes
				s.Requests += n - m.req0[route]
			}
		}
		s.BlobRequests = req["blob"] - m.req0["blob"]
	}
}

// firstLine runs cmd and returns when its first line of output arrived
// (measured from start) and when it exited. The line must be want.
func firstLine(start time.Time, cmd *exec.Cmd, want string) (first, total time.Duration, err error) {
	_, first, total, err = firstLineStderr(start, cmd, want)
	return first, total, err
}

// firstLineStderr is firstLine that also returns what cmd wrote to stderr.
func firstLineStderr(start time.Time, cmd *exec.Cmd, want string) (stderrText string, first, total time.Duration, err error) {
	var stderr strings.Builder
	cmd.Stderr = &stderr
	defer func() { stderrText = stderr.String() }()
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", 0, 0, err
	}
	if err := cmd.Start(); err != nil {
		return "", 0, 0, err
	}
	br := bufio.NewReader(out)
	line, rerr := br.ReadString('\n')
	first = time.Since(start)
	io.Copy(io.Discard, br)
	werr := cmd.Wait()
	total = time.Since(start)
	describe := func(err error) error {
		return fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, tailString(stderr.String(), 2000))
	}
	switch {
	case werr != nil:
		return "", 0, 0, describe(werr)
	case rerr != nil:
		return "", 0, 0, describe(fmt.Errorf("no output: %w", rerr))
	case strings.TrimSpace(line) != want:
		return "", 0, 0, describe(fmt.Errorf("first line %q, want %q", line, want))
	}
	return "", first, total, nil
}

// readyRE finds strata run's report of when the container's root was ready.
var readyRE = regexp.MustCompile(`\) ready in ([0-9.]+[a-zµ]+)`)

// strataCmd is a strata command on node root.
func (e *env) strataCmd(ctx context.Context, root string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, e.strata, append([]string{"--root", root}, args...)...)
}

// strataRun measures `strata run --rm` of im from registry addr on root.
// flags go before the command (global flags).
func (e *env) strataRun(ctx context.Context, root, addr string, im *image, flags ...string) report.Sample {
	s, _ := e.strataRunOut(ctx, root, addr, im, flags...)
	return s
}

// strataRunOut is strataRun that also returns what strata wrote to stderr.
func (e *env) strataRunOut(ctx context.Context, root, addr string, im *image, flags ...string) (report.Sample, string) {
	return e.strataRunTagOut(ctx, root, addr, im, "latest", flags...)
}

// strataRunTagOut is strataRunOut of tag of im's repository.
func (e *env) strataRunTagOut(ctx context.Context, root, addr string, im *image, tag string, flags ...string) (report.Sample, string) {
	ctx, cancel := context.WithTimeout(ctx, sampleTimeout)
	defer cancel()
	var s report.Sample
	if os.Getenv("STRATA_BENCH_LOGS") != "" {
		flags = append([]string{"--log-level", "debug"}, flags...)
	}
	// The node daemon is started before the clock, with the same global
	// flags, as containerd and the stargz snapshotter are for theirs: a
	// node runs its agent before it is asked to start a container.
	if out, err := e.strataCmd(ctx, root, append(flags, "ps")...).CombinedOutput(); err != nil {
		s.Error = fmt.Sprintf("starting the node daemon: %v\n%s", err, out)
		return s, ""
	}
	m := e.begin(ctx)
	args := append(append(flags, "run", "--rm", "--plain-http", addr+"/"+im.repo()+":"+tag), im.Args...)
	stderr, first, total, err := firstLineStderr(m.start, e.strataCmd(ctx, root, args...), im.Want)
	m.end(ctx, &s)
	s.FirstLine, s.Total = first, total
	if mm := readyRE.FindStringSubmatch(stderr); mm != nil {
		s.Ready, _ = time.ParseDuration(mm[1])
	}
	if err != nil {
		s.Error = err.Error()
		if b, rerr := os.ReadFile(filepath.Join(root, "daemon.log")); rerr == nil {
			s.Error += "\nnode daemon log:\n" + tailString(string(b), 1500)
		}
	}
	return s, stderr
}

// strataLazy measures a cold start without a start-up profile on a fresh
// node root, then a warm one on the same root, then removes the node.
func (e *env) strataLazy(ctx context.Context, im *image, id string) (cold, warm report.Sample) {
	root := filepath.Join(e.disk, "strata-"+id)
	defer e.removeNode(root)
	cold = e.strataRun(ctx, root, e.strataProxy.Addr(), im, "--startup-profiles", "off")
	if cold.Error != "" {
		warm.Error = "cold start failed"
		return cold, warm
	}
	bg, err := e.waitBackground(ctx, root)
	if err != nil {
		warm.Error = err.Error()
		return cold, warm
	}
	warm = e.strataRun(ctx, root, e.strataProxy.Addr(), im, "--startup-profiles", "off")
	warm.BackgroundBytes, warm.BackgroundTime = bg.bytes, bg.took
	return cold, warm
}

// background is what a node's background completion of files did between
// two runs: the bytes it fetched over the link, and how long it took.
type background struct {
	bytes int64
	took  time.Duration
}

// waitBackground waits, untimed, until the node on root has put the files
// the last run read whole into its cache (node.Options.CompleteMax), which
// it does on its own once the node is quiet: a warm start is one on a node
// that did so.
func (e *env) waitBackground(ctx context.Context, root string) (background, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := nodeapi.Dial(ctx, root, nil)
	if err != nil {
		return background{}, fmt.Errorf("node daemon: %w", err)
	}
	start, link0 := time.Now(), e.linkBytes()
	// The kernel tells the node that files were closed asynchronously;
	// by the node's quiet time (1 s) everything read has been handed over.
	select {
	case <-ctx.Done():
		return background{}, ctx.Err()
	case <-time.After(1500 * time.Millisecond):
	}
	for {
		r, err := c.DF(ctx)
		if err != nil {
			return background{}, fmt.Errorf("waiting for the node's background completion: %w", err)
		}
		if r.Background == nil || r.Background.Pending == 0 {
			bg := background{bytes: e.linkBytes() - link0, took: time.Since(start)}
			if r.Background != nil {
				e.logf("background completion: %d files (%d bytes), %d bytes over the link, waited %v",
					r.Background.Files, r.Background.Bytes, bg.bytes, bg.took.Round(time.Millisecond))
			}
			return bg, nil
		}
		select {
		case <-ctx.Done():
			return background{}, fmt.Errorf("waiting for the node's background completion: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// strataProfiled measures a cold start on a fresh node root of an image
// whose start-up profile is in the registry (recordProfile), then removes
// the node.
func (e *env) strataProfiled(ctx context.Context, im *image, id string) report.Sample {
	if im.profileErr != nil {
		return report.Sample{Error: "no start-up profile: " + im.profileErr.Error()}
	}
	root := filepath.Join(e.disk, "profiled-"+id)
	defer e.removeNode(root)
	return e.strataRun(ctx, root, e.strataProxy.Addr(), im, "--startup-profiles", "use")
}

// recordProfile starts im once, untimed, on a throwaway node that records
// what the workload reads and stores it in strata's registry as the
// image's start-up profile, and waits until the registry has it.
func (e *env) recordProfile(ctx context.Context, im *image) error {
	root := filepath.Join(e.disk, "recorder-"+im.Name)
	defer e.removeNode(root)
	if s := e.strataRun(ctx, root, e.strataProxy.Addr(), im, "--startup-profiles", "auto"); s.Error != "" {
		return errors.New(s.Error)
	}
	base := "http://" + e.strataProxy.Addr() + "/v2/" + im.repo()
	req, _ := http.NewRequestWithContext(ctx, http.MethodHead, base+"/manifests/latest", nil)
	req.Header.Set("Accept", ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	m, err := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return fmt.Errorf("manifest digest of %s: %w", im.repo(), err)
	}
	url := "http://" + e.strataProxy.Addr() + api.ProfilePath(im.repo(), m)
	for deadline := time.Now().Add(30 * time.Second); ; {
		resp, err := http.Get(url)
		if err != nil {
			return err
		}
		var p api.Profile
		if resp.StatusCode == http.StatusOK {
			err = json.NewDecoder(resp.Body).Decode(&p)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			if err != nil {
				return fmt.Errorf("start-up profile of %s: %w", im.repo(), err)
			}
			n := 0
			for _, l := range p.Layers {
				n += len(l.Frames)
			}
			pack := "no pack"
			if p.Pack != nil {
				var read int64
				for _, s := range p.Pack.Spans {
					read += s[2]
				}
				pack = fmt.Sprintf("pack of %d bytes for %d bytes read", p.Pack.Size, read)
			}
			e.logf("  %s: start-up profile recorded: %d frames in %d layers, %s", im.Name, n, len(p.Layers), pack)
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no start-up profile for %s after 30 s (%s)", im.repo(), resp.Status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// expandAt runs strata expand on im in the registry at addr (untimed but
// for the log) and checks that the node will find the expansion there.
func (e *env) expandAt(ctx context.Context, addr string, im *image) error {
	t0 := time.Now()
	out, err := exec.CommandContext(ctx, e.strata, "expand", "--plain-http", addr+"/"+im.repo()+":latest").CombinedOutput()
	if err != nil {
		return fmt.Errorf("strata expand: %w\n%s", err, tailString(string(out), 1500))
	}
	e.logf("  %s: strata expand took %.1f s: %s", im.Name, time.Since(t0).Seconds(), strings.TrimSpace(lastLine(string(out))))
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// referrersAddr is where strataReferrers's images are: the CNCF registry,
// under a prefix of their own.
func (e *env) referrersAddr() string { return e.distProxy.Addr() + "/referrers" }

// strataReferrers measures a cold start without a start-up profile on a
// fresh node root from the CNCF registry, through the expansion
// referrers strata expand pushed there (expandAt).
func (e *env) strataReferrers(ctx context.Context, im *image, id string) report.Sample {
	if im.expandErr != nil {
		return report.Sample{Error: "no expansion referrer: " + im.expandErr.Error()}
	}
	root := filepath.Join(e.disk, "referrers-"+id)
	defer e.removeNode(root)
	s, stderr := e.strataRunOut(ctx, root, e.referrersAddr(), im, "--startup-profiles", "off")
	if s.Error == "" && !strings.Contains(stderr, "lazy: expansion referrers") {
		s.Error = "the node did not start lazily from the expansion referrers: " + tailString(stderr, 500)
	}
	return s
}

// strataFallback measures a full pull from the CNCF registry on a fresh
// node root.
func (e *env) strataFallback(ctx context.Context, im *image, id string) report.Sample {
	root := filepath.Join(e.disk, "fallback-"+id)
	defer e.removeNode(root)
	s, stderr := e.strataRunOut(ctx, root, e.distProxy.Addr(), im)
	if s.Error == "" && !strings.Contains(stderr, "fallback: full pull") {
		s.Error = "the node did not pull the image whole: " + tailString(stderr, 500)
	}
	return s
}

// removeNode stops the node daemon of root and removes everything of it.
func (e *env) removeNode(root string) {
	if d := os.Getenv("STRATA_BENCH_LOGS"); d != "" {
		if b, err := os.ReadFile(filepath.Join(root, "daemon.log")); err == nil {
			os.WriteFile(filepath.Join(d, filepath.Base(root)+".log"), b, 0o644)
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, "daemon.pid")); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			syscall.Kill(pid, syscall.SIGINT)
			waitGone(pid, 15*time.Second)
		}
	}
	umountBelow(root)
	if err := os.RemoveAll(root); err != nil {
		e.logf("removing %s: %v", root, err)
	}
}

// waitGone waits until process pid has exited (or is a zombie), killing it
// after d.
func waitGone(pid int, d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return
		}
		if _, rest, ok := strings.Cut(string(b), ") "); ok && strings.HasPrefix(rest, "Z") {
			return
		}
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			deadline = time.Now().Add(5 * time.Second)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// containerd is one containerd daemon with its own root, state and socket.
type containerd struct {
	dir, root, state, sock string
	cmd                    *exec.Cmd
	log                    *os.File
}

// startContainerd starts a fresh containerd (empty content store and
// snapshots) whose root is on the node disk; extra is appended to its
// configuration (proxy plugins).
func (e *env) startContainerd(ctx context.Context, id, extra string) (*containerd, error) {
	c := &containerd{
		dir:  filepath.Join(e.work, "containerd-"+id),
		root: filepath.Join(e.disk, "containerd-"+id),
		sock: filepath.Join(e.work, "ctrd-"+id+".sock"),
	}
	c.state = filepath.Join(c.dir, "state")
	for _, d := range []string{c.dir, c.root, c.state} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, err
		}
	}
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, c.root, c.state, c.sock, c.sock+".ttrpc", filepath.Join(c.dir, "opt")) + extra
	cfgFile := filepath.Join(c.dir, "config.toml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	var err error
	if c.log, err = os.Create(filepath.Join(c.dir, "containerd.log")); err != nil {
		return nil, err
	}
	c.cmd = exec.Command("containerd", "--config", cfgFile)
	c.cmd.Stdout, c.cmd.Stderr = c.log, c.log
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		c.log.Close()
		return nil, fmt.Errorf("containerd: %w", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := exec.CommandContext(ctx, "ctr", "-a", c.sock, "version").Run(); err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(c.log.Name())
			e.stopContainerd(c, "")
			return nil, fmt.Errorf("containerd did not start:\n%s", tailString(string(b), 2000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopContainerd stops c and everything it started, even after a failed
// or interrupted run: the task and container of id, containerd, and any
// shim left behind (shims outlive containerd by design).
func (e *env) stopContainerd(c *containerd, id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctr := func(args ...string) {
		exec.CommandContext(ctx, "ctr", append([]string{"-a", c.sock}, args...)...).Run()
	}
	if id != "" {
		ctr("tasks", "kill", "-s", "SIGKILL", id)
		ctr("tasks", "delete", "-f", id)
		ctr("containers", "delete", id)
	}
	stop(c.cmd, 15*time.Second)
	killMatching(c.sock)
	c.log.Close()
	umountBelow(c.root)
	umountBelow(c.state)
	os.RemoveAll(c.root)
	os.RemoveAll(c.dir)
}

// containerdRun measures containerd's normal path: `ctr image pull`, then
// `ctr run --rm`, from a fresh content store.
func (e *env) containerdRun(ctx context.Context, im *image, id string) (s report.Sample) {
	ctx, cancel := context.WithTimeout(ctx, sampleTimeout)
	defer cancel()
	c, err := e.startContainerd(ctx, id, "")
	if err != nil {
		s.Error = err.Error()
		return s
	}
	name := fmt.Sprintf("bench-%d-%s", os.Getpid(), id)
	started := ""
	defer func() { e.stopContainerd(c, started) }()
	ref := e.distProxy.Addr() + "/" + im.repo() + ":latest"
	m := e.begin(ctx)
	defer func() { m.end(ctx, &s) }()
	pull := exec.CommandContext(ctx, "ctr", "-a", c.sock, "images", "pull", "--plain-http", ref)
	if out, err := pull.CombinedOutput(); err != nil {
		s.Error = fmt.Sprintf("ctr images pull: %v\n%s", err, tailString(string(out), 2000))
		return s
	}
	started = name
	args := append([]string{"-a", c.sock, "run", "--rm", ref, name}, im.Args...)
	first, total, err := firstLine(m.start, exec.CommandContext(ctx, "ctr", args...), im.Want)
	s.FirstLine, s.Total = first, total
	if err != nil {
		s.Error = err.Error()
	}
	return s
}

// killMatching kills every process whose command line contains s.
func killMatching(s string) {
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + ent.Name() + "/cmdline")
		if err == nil && strings.Contains(string(b), s) {
			syscall.Kill(pid, syscall.SIGKILL)
			waitGone(pid, 5*time.Second)
		}
	}
}
