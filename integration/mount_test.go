package integration

import (
	"bufio"
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/testenv"
)

// blobBytesServed reads from the registry's metrics how many body bytes it
// has sent for blob requests.
func blobBytesServed(t *testing.T, reg *registryProc) int64 {
	t.Helper()
	resp, err := http.Get("http://" + reg.Addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, `strata_registry_response_bytes_total{route="blob"}`) {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return int64(v)
		}
	}
	return 0
}

// strata runs the strata CLI with a node root and returns its stdout; it
// fails the test on error.
func strata(t *testing.T, root string, args ...string) string {
	t.Helper()
	out, errOut, err := strataErr(root, args...)
	if err != nil {
		t.Fatalf("strata %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, tail(out, 2000), tail(errOut, 4000))
	}
	return out
}

func strataErr(root string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, strataBin, append([]string{"--root", root}, args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// nodeRoot makes a node root and stops its daemon at the end of the test.
func nodeRoot(t *testing.T) string {
	root := filepath.Join(t.TempDir(), "node")
	t.Cleanup(func() {
		if b, err := os.ReadFile(filepath.Join(root, "daemon.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				if p, err := os.FindProcess(pid); err == nil {
					p.Signal(os.Interrupt)
					for i := 0; i < 100; i++ {
						if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err != nil {
							break
						}
						time.Sleep(50 * time.Millisecond)
					}
				}
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(root, "daemon.log"))
			t.Logf("daemon log:\n%s", tail(string(b), 6000))
		}
		// Nothing of this root may stay mounted.
		if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), root) {
			t.Errorf("mounts left behind under %s:\n%s", root, grepLines(string(b), root))
		}
	})
	return root
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// pythonNode is the Debian+python3 image pushed to a registry of its own,
// a node root and an empty directory to mount it on.
type pythonNode struct {
	reg            *registryProc
	ref, root, mnt string
	rootfs         string // the tree the image was made from
	layerSize      int64
}

func pythonOnNode(t *testing.T) pythonNode {
	testenv.RequireFUSE(t)
	layout, rootfs, layerSize := debianPython(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/debian/python:latest"
	pushLayout(t, layout, "latest", ref)
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.MkdirAll(mnt, 0o755)
	return pythonNode{reg: reg, ref: ref, root: nodeRoot(t), mnt: mnt, rootfs: rootfs, layerSize: layerSize}
}

// TestMountDebianPython mounts a real Debian+python3 image from
// `strata registry serve`, checks that reading a handful of files fetches
// a small fraction of the layer, that the whole tree equals the root
// filesystem the layer was made from, and that python3 runs from it under
// chroot with a cache far smaller than the image.
func TestMountDebianPython(t *testing.T) {
	p := pythonOnNode(t)
	reg, ref, root, mnt, rootfs, layerSize := p.reg, p.ref, p.root, p.mnt, p.rootfs, p.layerSize
	before := blobBytesServed(t, reg)
	strata(t, root, "--cache-size", "16MiB", "mount", "--plain-http", ref, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			strataErr(root, "umount", mnt)
		}
	})

	// A handful of files.
	for _, f := range []string{"etc/os-release", "etc/passwd", "usr/bin/python3.11", "usr/lib/python3.11/os.py"} {
		if _, err := os.ReadFile(filepath.Join(mnt, f)); err != nil {
			t.Fatalf("read %s: %v", f, err)
		}
	}
	served := blobBytesServed(t, reg) - before
	t.Logf("reading 4 files fetched %d bytes of a %d-byte layer (%.1f%%)", served, layerSize, 100*float64(served)/float64(layerSize))
	if served > layerSize/5 {
		t.Errorf("reading 4 files fetched %d bytes, more than a fifth of the %d-byte layer", served, layerSize)
	}

	// python3 from the mounted tree, with a 16 MiB cache.
	out, err := exec.Command("chroot", mnt, "/usr/bin/python3", "-c", "import json, os; print('hello', os.getpid() > 0)").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "hello True" {
		t.Fatalf("python3 under chroot: %v: %s", err, out)
	}

	// df reports the layer with what was fetched.
	df := strata(t, root, "df")
	if !strings.Contains(df, "lazy") || !strings.Contains(df, "cache:") {
		t.Errorf("df output:\n%s", df)
	}
	t.Logf("strata df:\n%s", df)

	// The whole tree equals the root filesystem the image was made from.
	want, err := scanTree(rootfs, true)
	if err != nil {
		t.Fatal(err)
	}
	got, err := scanTree(mnt, true)
	if err != nil {
		t.Fatal(err)
	}
	if diffs := compareTrees(want, got); len(diffs) > 0 {
		t.Errorf("mounted tree differs from the reference (%d entries):\n%s", len(want), strings.Join(diffs, "\n"))
	}

	strata(t, root, "umount", mnt)
	mounted = false
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), mnt) {
		t.Fatalf("%s still mounted after umount", mnt)
	}
}

// TestMountCompletesFiles: a file a process read through a lazy layer
// without its whole content in the cache (python3's 6 MB program) is
// completed into the node's cache in the background once the node is
// quiet, and `strata df` says so; the layer stays mounted a while after
// its last user is gone.
func TestMountCompletesFiles(t *testing.T) {
	p := pythonOnNode(t)
	ref, root, mnt := p.ref, p.root, p.mnt
	strata(t, root, "mount", "--plain-http", ref, mnt)
	mounted := true
	defer func() {
		if mounted {
			strataErr(root, "umount", mnt)
		}
	}()
	out, err := exec.Command("chroot", mnt, "/usr/bin/python3", "-c", "print('hello')").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "hello" {
		t.Fatalf("python3 under chroot: %v: %s", err, out)
	}
	done := regexp.MustCompile(`background: ([1-9][0-9]*) files completed into the cache .*, 0 pending, 0 failed`)
	var df string
	for end := time.Now().Add(60 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if df = strata(t, root, "df"); done.MatchString(df) {
			break
		}
	}
	if !done.MatchString(df) {
		t.Fatalf("no background completion reported:\n%s", df)
	}
	t.Logf("strata df:\n%s", df)

	// Unmounted, its layer lingers, mounted, for the next container or
	// mount (the daemon's --layer-linger); the daemon's exit unmounts it
	// (nodeRoot checks).
	strata(t, root, "umount", mnt)
	mounted = false
	if b, _ := os.ReadFile("/proc/self/mountinfo"); !strings.Contains(string(b), filepath.Join(root, "layers")) {
		t.Error("the layer was unmounted at once, not left to linger")
	}
	if df := strata(t, root, "df"); !regexp.MustCompile(`lazy\s+true`).MatchString(df) {
		t.Errorf("df does not show the lingering layer mounted:\n%s", df)
	}
}
