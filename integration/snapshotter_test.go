package integration

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/testimage"
)

// crictlVersion is the CRI client the snapshotter tests drive containerd
// with, built from the Go module proxy.
const crictlVersion = "sigs.k8s.io/cri-tools/cmd/crictl@v1.37.0"

// buildCrictl builds crictl once per machine (cached beside the test images).
func buildCrictl(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(testimage.DefaultCacheDir, "bin", "crictl-v1.37.0")
	bin := filepath.Join(dir, "crictl")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	os.MkdirAll(dir, 0o755)
	install := exec.CommandContext(ctx, "go", "install", crictlVersion)
	install.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod")
	install.Dir = dir
	if out, err := install.CombinedOutput(); err != nil {
		testenv.Unavailable(t, "cannot build crictl: "+err.Error()+"\n"+tail(string(out), 2000))
	}
	return bin
}

// busyboxLayout writes an OCI layout with two images sharing a busybox
// layer: "pause" (sleeps; the pod sandbox image) and "hello" (echoes hello)
// whose second layer is 16 MiB of incompressible data nobody reads. It
// returns the layout and the total size of hello's layer blobs.
func busyboxLayout(t *testing.T) (string, int64) {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "test needs a static /bin/busybox (busybox-static): "+err.Error())
	}
	base, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Mode: 0o755, Content: bb},
		{Name: "bin/sh", Type: tar.TypeSymlink, Linkname: "busybox"},
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
	})
	if err != nil {
		t.Fatal(err)
	}
	filler := make([]byte, 16<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range filler {
		filler[i] = byte(r.Uint32())
	}
	data, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "data/", Type: tar.TypeDir},
		{Name: "data/filler", Content: filler},
		{Name: "data/hello.txt", Content: []byte("hello from a layer\n")},
	})
	if err != nil {
		t.Fatal(err)
	}
	baseLayer, dataLayer := ocilayout.GzipLayer(base), ocilayout.GzipLayer(data)
	layout := filepath.Join(t.TempDir(), "oci")
	env := []string{"PATH=/bin"}
	if _, err := ocilayout.Write(layout, "pause", ocilayout.Image{
		Layers: []ocilayout.Layer{baseLayer},
		Config: ocispec.ImageConfig{Env: env, Cmd: []string{"/bin/busybox", "sleep", "100000"}},
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := ocilayout.Write(layout, "hello", ocilayout.Image{
		Layers: []ocilayout.Layer{baseLayer, dataLayer},
		Config: ocispec.ImageConfig{Env: env, Cmd: []string{"/bin/busybox", "cat", "/data/hello.txt"}},
	}); err != nil {
		t.Fatal(err)
	}
	return layout, int64(len(baseLayer.Blob) + len(dataLayer.Blob))
}

// containerd2Version is the containerd 2.x release the snapshotter tests
// run against besides the distribution's containerd (Debian packages 1.6
// only); it is built from the Go module proxy.
const containerd2Version = "v2.4.2"

// containerdVersion is a containerd the CRI scenarios run against.
type containerdVersion struct {
	name string
	// bin returns the directory holding containerd, ctr and
	// containerd-shim-runc-v2, or "" for the ones on PATH.
	bin func(t *testing.T) string
	// config is containerd's configuration for e.
	config func(e *criEnv, sandboxImage string) string
	// ctrLabels: `ctr images pull` labels layer snapshots, so it pulls
	// lazily too (containerd 2.x: its transfer service does, given the
	// snapshotter's exports).
	ctrLabels bool
	// criTransfer: the CRI plugin pulls through the transfer service.
	criTransfer bool
}

// containerdVersions are the containerds every snapshotter scenario runs
// against, as subtests named after them.
var containerdVersions = []containerdVersion{
	{name: "containerd-debian", bin: func(t *testing.T) string {
		testenv.RequireTool(t, "containerd", "ctr", "containerd-shim-runc-v2")
		return ""
	}, config: configV2},
	{name: "containerd-" + containerd2Version, bin: buildContainerd2, config: configV3(true), ctrLabels: true},
	{name: "containerd-" + containerd2Version + "-transfer", bin: buildContainerd2, config: configV3(false), ctrLabels: true, criTransfer: true},
}

// forEachContainerd runs scenario as a subtest per containerd version.
func forEachContainerd(t *testing.T, scenario func(t *testing.T, cv containerdVersion)) {
	for _, cv := range containerdVersions {
		t.Run(cv.name, func(t *testing.T) { scenario(t, cv) })
	}
}

// buildContainerd2 builds containerd, ctr and containerd-shim-runc-v2 of
// containerd2Version once per machine (cached beside crictl) and returns
// their directory. The build is static (no cgo; the btrfs, devmapper and
// ZFS snapshotters, which would need it, are left out).
func buildContainerd2(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(testimage.DefaultCacheDir, "bin", "containerd-"+containerd2Version)
	names := []string{"containerd", "ctr", "containerd-shim-runc-v2"}
	have := func() bool {
		for _, n := range names {
			if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
				return false
			}
		}
		return true
	}
	if have() {
		return dir
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	os.MkdirAll(filepath.Dir(dir), 0o755)
	// Build into a temporary directory and rename it: the cache holds all
	// three programs or none.
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".containerd-build-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	args := []string{"install", "-tags", "no_btrfs no_devmapper no_zfs",
		"-ldflags", "-s -w -X github.com/containerd/containerd/v2/version.Version=" + containerd2Version}
	for _, n := range names {
		args = append(args, "github.com/containerd/containerd/v2/cmd/"+n+"@"+containerd2Version)
	}
	install := exec.CommandContext(ctx, "go", args...)
	install.Env = append(os.Environ(), "GOBIN="+tmp, "GOFLAGS=-mod=mod", "CGO_ENABLED=0")
	install.Dir = tmp
	if out, err := install.CombinedOutput(); err != nil {
		testenv.Unavailable(t, "cannot build containerd "+containerd2Version+": "+err.Error()+"\n"+tail(string(out), 2000))
	}
	os.Chmod(tmp, 0o755)
	if err := os.Rename(tmp, dir); err != nil && !have() {
		t.Fatal(err)
	}
	return dir
}

// configV2 is a containerd 1.x configuration (version 2).
func configV2(e *criEnv, sandboxImage string) string {
	return fmt.Sprintf(`version = 2
root = "%[1]s/root"
state = "%[1]s/state"

[grpc]
  address = "%[2]s"

[ttrpc]
  address = "%[2]s.ttrpc"

[proxy_plugins]
  [proxy_plugins.strata]
    type = "snapshot"
    address = "%[3]s"

[plugins."io.containerd.internal.v1.opt"]
  path = "%[1]s/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%[4]s"
  # Machines that are themselves containers may not lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "strata"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "%[5]s"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "%[1]s/cni/bin"
    conf_dir = "%[1]s/cni/conf"
`, e.dir, e.sock, e.snapSock, sandboxImage, e.hostsDir)
}

// configV3 returns a containerd 2.x configuration (version 3: the CRI
// plugin is split into io.containerd.cri.v1.images and
// io.containerd.cri.v1.runtime). The transfer service (`ctr images pull`,
// and CRI pulls since 2.1) may unpack into strata and labels its layer
// snapshots; with localPull the CRI plugin pulls itself instead, as it does
// whenever disable_snapshot_annotations = false.
func configV3(localPull bool) func(e *criEnv, sandboxImage string) string {
	return func(e *criEnv, sandboxImage string) string {
		annotations := "# The snapshotter's exports enable the labels through the transfer service."
		if localPull {
			annotations = "# The CRI plugin labels layer snapshots when this is false (and pulls without the transfer service).\n  disable_snapshot_annotations = false"
		}
		return fmt.Sprintf(`version = 3
root = "%[1]s/root"
state = "%[1]s/state"

[grpc]
  address = "%[2]s"

[ttrpc]
  address = "%[2]s.ttrpc"

[proxy_plugins]
  [proxy_plugins.strata]
    type = "snapshot"
    address = "%[3]s"
    # The transfer service labels layer snapshots only with this.
    [proxy_plugins.strata.exports]
      enable_remote_snapshot_annotations = "true"

[plugins.'io.containerd.internal.v1.opt']
  path = "%[1]s/opt"

# NRI (enabled by default in 2.x) would listen on the host's /var/run/nri/nri.sock.
[plugins.'io.containerd.nri.v1.nri']
  disable = true

# The transfer service unpacks only into the snapshotters listed here.
[plugins.'io.containerd.transfer.v1.local']
  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = "%[6]s"
    snapshotter = "overlayfs"
  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = "%[6]s"
    snapshotter = "strata"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "strata"
  %[7]s
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "%[4]s"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "%[5]s"

[plugins.'io.containerd.cri.v1.runtime']
  # Machines that are themselves containers may not lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["%[1]s/cni/bin"]
    conf_dir = "%[1]s/cni/conf"
`, e.dir, e.sock, e.snapSock, sandboxImage, e.hostsDir, runtime.GOOS+"/"+runtime.GOARCH, annotations)
	}
}

// criEnv is a real containerd (the distribution's package or a containerd
// 2.x built from source) with its own root, state and socket, configured
// with `strata snapshotter` as the proxy snapshotter "strata" and as the CRI
// plugin's snapshotter.
type criEnv struct {
	dir        string
	sock       string // containerd's
	snapSock   string
	strataRoot string
	hostsDir   string
	crictlBin  string
	ctrdBin    string // containerd
	ctrBin     string
	path       string // containerd's PATH (finds the matching shim first)
	snapLog    string
	ctrdLog    string
	snap, ctrd *exec.Cmd
	// snapArgs are more flags of the snapshotter; imageEndpoint, if set,
	// is crictl's image service instead of containerd's.
	snapArgs      []string
	imageEndpoint string
}

// newCRIEnv starts the snapshotter and containerd cv; sandboxImage is the
// CRI plugin's pause image.
func newCRIEnv(t *testing.T, cv containerdVersion, sandboxImage string) *criEnv {
	t.Helper()
	return newCRIEnvWith(t, cv, sandboxImage, nil)
}

// newCRIEnvWith is newCRIEnv with setup applied to the environment before
// anything starts.
func newCRIEnvWith(t *testing.T, cv containerdVersion, sandboxImage string, setup func(*criEnv)) *criEnv {
	t.Helper()
	testenv.RequireFUSE(t)
	testenv.RequireTool(t, "runc", "skopeo")
	bin := cv.bin(t)
	dir, err := os.MkdirTemp("", "strata-ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	e := &criEnv{
		dir: dir, sock: filepath.Join(dir, "containerd.sock"), snapSock: filepath.Join(dir, "strata.sock"),
		strataRoot: filepath.Join(dir, "strata"), hostsDir: filepath.Join(dir, "certs.d"),
		snapLog: filepath.Join(dir, "snapshotter.log"), ctrdLog: filepath.Join(dir, "containerd.log"),
		ctrdBin: "containerd", ctrBin: "ctr", path: os.Getenv("PATH"),
	}
	if bin != "" {
		e.ctrdBin, e.ctrBin = filepath.Join(bin, "containerd"), filepath.Join(bin, "ctr")
		e.path = bin + string(os.PathListSeparator) + e.path
	}
	e.crictlBin = buildCrictl(t)
	if out, err := exec.Command(e.ctrdBin, "--version").CombinedOutput(); err == nil {
		t.Logf("%s", strings.TrimSpace(string(out)))
	}
	os.MkdirAll(e.hostsDir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cv.config(e, sandboxImage)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if e.ctrd != nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			runErr(ctx, e.crictlBin, e.crictlArgs("rmp", "-fa")...)
			cancel()
		}
		e.stopContainerd(t)
		e.stopSnapshotter(t)
		if t.Failed() {
			b, _ := os.ReadFile(e.snapLog)
			t.Logf("snapshotter log:\n%s", tail(string(b), 8000))
			b, _ = os.ReadFile(e.ctrdLog)
			t.Logf("containerd log:\n%s", tail(grepLines(string(b), "level=error")+"\n"+grepLines(string(b), "level=warn"), 6000))
		}
		if left := mountsUnder(dir); left != "" {
			t.Errorf("mounts left behind under %s:\n%s", dir, left)
			for _, l := range strings.Split(left, "\n") {
				if f := strings.Fields(l); len(f) > 4 {
					syscall.Unmount(f[4], syscall.MNT_DETACH)
				}
			}
		}
		os.RemoveAll(dir)
	})
	if setup != nil {
		setup(e)
	}
	e.startSnapshotter(t)
	e.startContainerd(t)
	return e
}

// mountsUnder lists the mountinfo lines of mount points under dir.
func mountsUnder(dir string) string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func (e *criEnv) startSnapshotter(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(e.snapLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := append([]string{"--root", e.strataRoot, "--cache-size", "256MiB", "--log-level", "debug",
		"snapshotter", "--address", e.snapSock, "--hosts-dir", e.hostsDir}, e.snapArgs...)
	cmd := exec.Command(strataBin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.snap = cmd
	waitSocket(t, e.snapSock, "the snapshotter")
}

func (e *criEnv) stopSnapshotter(t *testing.T) {
	t.Helper()
	stopProcess(e.snap)
	e.snap = nil
}

func (e *criEnv) startContainerd(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(e.ctrdLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(e.ctrdBin, "--config", filepath.Join(e.dir, "config.toml"))
	cmd.Env = append(os.Environ(), "PATH="+e.path)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.ctrd = cmd
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := runErr(ctx, e.crictlBin, e.crictlArgs("info")...)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not start: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (e *criEnv) stopContainerd(t *testing.T) {
	t.Helper()
	stopProcess(e.ctrd)
	e.ctrd = nil
}

func stopProcess(cmd *exec.Cmd) {
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func waitSocket(t *testing.T, path, what string) {
	t.Helper()
	for i := 0; i < 300; i++ {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not create %s", what, path)
}

func (e *criEnv) crictlArgs(args ...string) []string {
	ep, image := "unix://"+e.sock, "unix://"+e.sock
	if e.imageEndpoint != "" {
		image = "unix://" + e.imageEndpoint
	}
	return append([]string{"--runtime-endpoint", ep, "--image-endpoint", image, "--timeout", "3m"}, args...)
}

// crictl runs crictl against the environment's containerd.
func (e *criEnv) crictl(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.crictlBin, e.crictlArgs(args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("crictl %s: %v\n%s%s", strings.Join(args, " "), err, tail(stdout.String(), 2000), tail(stderr.String(), 4000))
	}
	return strings.TrimSpace(stdout.String())
}

// ctr runs ctr against the environment's containerd and returns its
// standard output (containerd 2.x's ctr warns on stderr, e.g. about cgroup v1).
func (e *criEnv) ctr(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.ctrBin, append([]string{"--address", e.sock}, args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("ctr %s: %v\n%s%s", strings.Join(args, " "), err, tail(stdout.String(), 2000), tail(stderr.String(), 4000))
	}
	return stdout.String()
}

// plainHTTP writes containerd's hosts.toml for a registry on plain HTTP.
func (e *criEnv) plainHTTP(t *testing.T, registry string) {
	t.Helper()
	d := filepath.Join(e.hostsDir, registry)
	os.MkdirAll(d, 0o755)
	toml := fmt.Sprintf("server = \"http://%[1]s\"\n\n[host.\"http://%[1]s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", registry)
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// runPod starts a pod sandbox on the host network (no CNI needed) and
// returns its id and config file.
func (e *criEnv) runPod(t *testing.T, name string) (string, string) {
	t.Helper()
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": name + "-uid", "attempt": 0},
		"log_directory": filepath.Join(e.dir, "logs", name),
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
	}
	p := filepath.Join(e.dir, name+"-pod.json")
	b, _ := json.Marshal(cfg)
	os.WriteFile(p, b, 0o644)
	return e.crictl(t, "runp", p), p
}

// runContainer runs command (nil: the image's) as container name in the
// pod, waits for it to exit, removes it and returns its output.
func (e *criEnv) runContainer(t *testing.T, pod, podCfg, image, name string, command ...string) string {
	t.Helper()
	cfg := map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": image},
		"log_path": name + ".log",
		"linux":    map[string]any{},
	}
	if command != nil {
		cfg["command"] = command
	}
	p := filepath.Join(e.dir, name+"-ctr.json")
	b, _ := json.Marshal(cfg)
	os.WriteFile(p, b, 0o644)
	id := e.crictl(t, "create", pod, p, podCfg)
	e.crictl(t, "start", id)
	deadline := time.Now().Add(time.Minute)
	for {
		var st struct {
			Status struct {
				State    string `json:"state"`
				ExitCode int    `json:"exitCode"`
			} `json:"status"`
		}
		if err := json.Unmarshal([]byte(e.crictl(t, "inspect", id)), &st); err != nil {
			t.Fatal(err)
		}
		if st.Status.State == "CONTAINER_EXITED" {
			if st.Status.ExitCode != 0 {
				t.Errorf("container %s exited with %d", name, st.Status.ExitCode)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s did not exit: %s", name, st.Status.State)
		}
		time.Sleep(100 * time.Millisecond)
	}
	out := e.crictl(t, "logs", id)
	e.crictl(t, "rm", id)
	return out
}

// TestSnapshotterCRI pulls an image through containerd's CRI plugin with the
// strata snapshotter from `strata registry serve`: every layer is mounted
// remotely, containerd downloads none, a pod's container runs from it, and
// the registry serves a small fraction of the image's bytes. The snapshots
// survive restarts of the snapshotter and of containerd, and removing the
// pod and the images leaves no mount behind. Once per containerd version.
func TestSnapshotterCRI(t *testing.T) {
	testenv.RequireFUSE(t)
	layout, helloSize := busyboxLayout(t)
	reg := startRegistry(t)
	pause, hello := reg.Addr+"/strata/pause:latest", reg.Addr+"/strata/hello:latest"
	pushLayout(t, layout, "pause", pause)
	pushLayout(t, layout, "hello", hello)
	forEachContainerd(t, func(t *testing.T, cv containerdVersion) {
		e := newCRIEnv(t, cv, pause)
		e.plainHTTP(t, reg.Addr)

		e.crictl(t, "pull", pause)
		before := blobBytesServed(t, reg)
		e.crictl(t, "pull", hello)
		pod, podCfg := e.runPod(t, "strata")
		if out := e.runContainer(t, pod, podCfg, hello, "hello-1"); out != "hello from a layer" {
			t.Fatalf("container output %q", out)
		}
		served := blobBytesServed(t, reg) - before
		t.Logf("registry served %d blob bytes for an image of %d bytes of layers (%.1f%%)", served, helloSize, 100*float64(served)/float64(helloSize))
		if served > helloSize/5 {
			t.Errorf("registry served %d blob bytes, more than a fifth of the image's %d", served, helloSize)
		}
		log, _ := os.ReadFile(e.snapLog)
		if n := strings.Count(string(log), "layer mounted remotely"); n != 2 {
			t.Errorf("snapshotter mounted %d layers remotely, want 2 (pause's layer is shared with hello's first):\n%s", n, grepLines(string(log), "layer"))
		}
		if ctrdLog, _ := os.ReadFile(e.ctrdLog); cv.criTransfer && strings.Contains(string(ctrdLog), "Falling back to local image pull") {
			t.Errorf("the CRI plugin did not pull through the transfer service:\n%s", grepLines(string(ctrdLog), "local image pull"))
		}
		// ctr runs what CRI pulled lazily.
		if out := e.ctr(t, "-n", "k8s.io", "run", "--rm", "--snapshotter", "strata", hello, "ctr-hello"); out != "hello from a layer\n" {
			t.Errorf("ctr run output %q", out)
		}
		if cv.ctrLabels {
			// ctr pulls lazily itself: into the default namespace, where
			// containerd takes the remote snapshots strata already has.
			// Without the labels it would download both layers.
			before := blobBytesServed(t, reg)
			e.ctr(t, "images", "pull", "--plain-http", "--snapshotter", "strata", hello)
			served := blobBytesServed(t, reg) - before
			t.Logf("ctr images pull: registry served %d blob bytes", served)
			if served > helloSize/5 {
				t.Errorf("ctr images pull: registry served %d blob bytes, more than a fifth of the image's %d", served, helloSize)
			}
			if log2, _ := os.ReadFile(e.snapLog); strings.Contains(string(log2), "not mounted remotely") {
				t.Errorf("ctr images pull: layers not mounted remotely:\n%s", grepLines(string(log2), "not mounted remotely"))
			}
			if out := e.ctr(t, "run", "--rm", "--snapshotter", "strata", hello, "ctr-hello"); out != "hello from a layer\n" {
				t.Errorf("ctr run output %q", out)
			}
			e.ctr(t, "images", "rm", "--sync", hello)
		}

		// Restarts: the snapshotter mounts its remote layers again; containerd
		// finds its snapshots; a new container runs from them.
		e.stopSnapshotter(t)
		e.startSnapshotter(t)
		e.stopContainerd(t)
		e.startContainerd(t)
		if out := e.runContainer(t, pod, podCfg, hello, "hello-2"); out != "hello from a layer" {
			t.Fatalf("container output after restarts %q", out)
		}

		// Removing the pod and the images removes the snapshots and their mounts.
		e.crictl(t, "stopp", pod)
		e.crictl(t, "rmp", pod)
		e.crictl(t, "rmi", hello, pause)
		deadline := time.Now().Add(20 * time.Second)
		for mountsUnder(e.dir) != "" && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
		}
		if left := mountsUnder(e.dir); left != "" {
			t.Errorf("mounts left after removing the pod and the images:\n%s", left)
		}
		if snaps := strings.TrimSpace(e.ctr(t, "-n", "k8s.io", "snapshots", "--snapshotter", "strata", "ls")); strings.Count(snaps, "\n") > 0 {
			t.Errorf("snapshots left:\n%s", snaps)
		}
	})
}

// TestSnapshotterFallback pulls from a registry without layer mounts (the
// CNCF distribution registry): through CRI the snapshotter says why it does
// not mount the layers and containerd downloads and unpacks them into
// ordinary snapshots; through ctr (containerd 1.x: no labels; 2.x: labelled
// by the transfer service, so strata declines them) the same. Both run.
// Once per containerd version.
func TestSnapshotterFallback(t *testing.T) {
	testenv.RequireFUSE(t)
	layout, _ := busyboxLayout(t)
	addr := startDistribution(t)
	pause, hello := addr+"/strata/pause:latest", addr+"/strata/hello:latest"
	pushLayout(t, layout, "pause", pause)
	pushLayout(t, layout, "hello", hello)
	forEachContainerd(t, func(t *testing.T, cv containerdVersion) {
		e := newCRIEnv(t, cv, pause)
		e.plainHTTP(t, addr)

		e.crictl(t, "pull", hello)
		log, _ := os.ReadFile(e.snapLog)
		if !strings.Contains(string(log), "does not offer layer mounts") || strings.Contains(string(log), "layer mounted remotely") {
			t.Errorf("snapshotter log does not say why the layers were not mounted remotely:\n%s", tail(string(log), 4000))
		}
		t.Logf("snapshotter log:\n%s", grepLines(string(log), "not mounted remotely"))
		pod, podCfg := e.runPod(t, "fallback")
		if out := e.runContainer(t, pod, podCfg, hello, "hello"); out != "hello from a layer" {
			t.Fatalf("container output %q", out)
		}
		e.crictl(t, "stopp", pod)
		e.crictl(t, "rmp", pod)

		e.ctr(t, "images", "pull", "--plain-http", "--snapshotter", "strata", hello)
		if cv.ctrLabels {
			// The transfer service labelled the layers: strata declined them.
			log2, _ := os.ReadFile(e.snapLog)
			if n := strings.Count(string(log2), "not mounted remotely") - strings.Count(string(log), "not mounted remotely"); n != 2 {
				t.Errorf("ctr images pull: snapshotter declined %d layers, want 2:\n%s", n, grepLines(string(log2), "layer"))
			}
		}
		if out := e.ctr(t, "run", "--rm", "--snapshotter", "strata", hello, "ctr-hello"); out != "hello from a layer\n" {
			t.Fatalf("ctr run output %q", out)
		}
		e.ctr(t, "images", "rm", "--sync", hello)
	})
}

// TestSnapshotterCRIPython runs python3 from the Debian+python3 image (one
// 65 MB gzip layer) through CRI with the strata snapshotter: the registry
// serves a small fraction of the layer. Once per containerd version.
func TestSnapshotterCRIPython(t *testing.T) {
	testenv.RequireFUSE(t)
	layout, _, size := debianPython(t)
	bb, _ := busyboxLayout(t)
	reg := startRegistry(t)
	pause, py := reg.Addr+"/strata/pause:latest", reg.Addr+"/debian/python:latest"
	pushLayout(t, bb, "pause", pause)
	pushLayout(t, layout, "latest", py)
	forEachContainerd(t, func(t *testing.T, cv containerdVersion) {
		e := newCRIEnv(t, cv, pause)
		e.plainHTTP(t, reg.Addr)

		e.crictl(t, "pull", pause)
		pod, podCfg := e.runPod(t, "python")
		before := blobBytesServed(t, reg)
		start := time.Now()
		e.crictl(t, "pull", py)
		out := e.runContainer(t, pod, podCfg, py, "python", "python3", "-c", `print("hello")`)
		if out != "hello" {
			t.Fatalf("container output %q", out)
		}
		served := blobBytesServed(t, reg) - before
		t.Logf("pull and run in %s; registry served %d blob bytes for a layer of %d (%.1f%%)",
			time.Since(start).Round(time.Millisecond), served, size, 100*float64(served)/float64(size))
		if served > size/4 {
			t.Errorf("registry served %d blob bytes, more than a quarter of the layer's %d", served, size)
		}
		e.crictl(t, "stopp", pod)
		e.crictl(t, "rmp", pod)
		e.crictl(t, "rmi", py, pause)
	})
}

// TestSnapshotterReferrers pulls through CRI with the strata snapshotter
// from the CNCF distribution registry after `strata expand`: the layers
// are mounted remotely from the expansion referrers (found through the
// referrers tag) and a pod's container runs from them. Once per
// containerd version.
func TestSnapshotterReferrers(t *testing.T) {
	testenv.RequireFUSE(t)
	layout, _ := busyboxLayout(t)
	addr := startDistribution(t)
	pause, hello := addr+"/strata/pause:latest", addr+"/strata/hello:latest"
	pushLayout(t, layout, "pause", pause)
	pushLayout(t, layout, "hello", hello)
	for _, ref := range []string{pause, hello} {
		if out, errOut, code := strataNoRoot(t, "expand", "--plain-http", ref); code != 0 {
			t.Fatalf("strata expand %s: exit %d\n%s%s", ref, code, out, errOut)
		}
	}
	forEachContainerd(t, func(t *testing.T, cv containerdVersion) {
		e := newCRIEnv(t, cv, pause)
		e.plainHTTP(t, addr)

		e.crictl(t, "pull", pause)
		e.crictl(t, "pull", hello)
		log, _ := os.ReadFile(e.snapLog)
		if n := strings.Count(string(log), "layer mounted remotely"); n != 2 {
			t.Errorf("snapshotter mounted %d layers remotely, want 2:\n%s", n, grepLines(string(log), "layer"))
		}
		pod, podCfg := e.runPod(t, "referrers")
		if out := e.runContainer(t, pod, podCfg, hello, "hello"); out != "hello from a layer" {
			t.Fatalf("container output %q", out)
		}
		e.crictl(t, "stopp", pod)
		e.crictl(t, "rmp", pod)
		e.crictl(t, "rmi", hello, pause)
	})
}

// TestSnapshotterCRIProfile: an image whose start-up profile is in the
// registry (recorded by `strata run` on another node) starts in a pod with
// the profile's frames prefetched as the snapshotter mounts each layer.
func TestSnapshotterCRIProfile(t *testing.T) {
	testenv.RequireFUSE(t)
	requireRun(t)
	layout, _, size := debianPython(t)
	bb, _ := busyboxLayout(t)
	reg := startRegistry(t)
	pause, py := reg.Addr+"/strata/pause:latest", reg.Addr+"/debian/python:latest"
	pushLayout(t, bb, "pause", pause)
	pushLayout(t, layout, "latest", py)
	// Another node records the profile (the first start of the image).
	root := nodeRoot(t)
	if out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", py, "python3", "-c", `print("hello")`); code != 0 || out != "hello\n" {
		t.Fatalf("strata run: %d %q %s", code, out, errOut)
	}
	// The profile is stored when the container's lease ends.
	r, _ := remote.ParseReference(py)
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	img, err := c.Resolve(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		p, err := c.Profile(context.Background(), r.Repository, img.Digest)
		if err == nil && len(p.Layers) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no start-up profile stored: %v", err)
		}
	}

	e := newCRIEnv(t, containerdVersions[0], pause)
	e.plainHTTP(t, reg.Addr)
	e.crictl(t, "pull", pause)
	pod, podCfg := e.runPod(t, "python")
	before := blobBytesServed(t, reg)
	start := time.Now()
	e.crictl(t, "pull", py)
	if out := e.runContainer(t, pod, podCfg, py, "python", "python3", "-c", `print("hello")`); out != "hello" {
		t.Fatalf("container output %q", out)
	}
	served := blobBytesServed(t, reg) - before
	t.Logf("profiled: pull and run in %s; registry served %d blob bytes for a layer of %d", time.Since(start).Round(time.Millisecond), served, size)
	log, _ := os.ReadFile(e.snapLog)
	if !strings.Contains(string(log), "layer mounted with its image's start-up profile") {
		t.Errorf("the snapshotter mounted the layer without the profile:\n%s", grepLines(string(log), "layer"))
	}
	e.crictl(t, "stopp", pod)
	e.crictl(t, "rmp", pod)
}
