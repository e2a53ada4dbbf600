package integration

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// largestFiles returns regular files under dir, largest first (metadata only:
// walking a lazy mount fetches nothing).
func largestFiles(t *testing.T, dir string, n int) []string {
	t.Helper()
	type f struct {
		p    string
		size int64
	}
	var all []f
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				all = append(all, f{p, fi.Size()})
			}
		}
		return nil
	})
	for i := 0; i < len(all); i++ {
		for j := i + 1; j < len(all); j++ {
			if all[j].size > all[i].size {
				all[i], all[j] = all[j], all[i]
			}
		}
		if i >= n {
			break
		}
	}
	var out []string
	for i := 0; i < n && i < len(all); i++ {
		out = append(out, all[i].p)
	}
	return out
}

func daemonPID(t *testing.T, root string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "daemon.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// killDaemon kills root's node daemon (SIGKILL) and waits until it is
// gone; the next command starts another.
func killDaemon(t *testing.T, root string) {
	t.Helper()
	pid := daemonPID(t, root)
	syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestNodeFaults: the node daemon killed and restarted leaves no dead
// mounts behind; with the registry stopped, cached reads keep working and
// uncached reads fail with EIO within the fetch bound.
func TestNodeFaults(t *testing.T) {
	requireRun(t)
	layout, _, _ := debianPython(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/debian/python:latest"
	pushLayout(t, layout, "latest", ref)
	root := nodeRoot(t)
	dir1, dir2 := filepath.Join(t.TempDir(), "m1"), filepath.Join(t.TempDir(), "m2")
	os.MkdirAll(dir1, 0o755)
	os.MkdirAll(dir2, 0o755)
	t.Cleanup(func() { strataErr(root, "umount", dir1); strataErr(root, "umount", dir2) })

	strata(t, root, "--fetch-timeout", "3s", "mount", "--plain-http", ref, dir1)
	if _, err := os.ReadFile(filepath.Join(dir1, "etc/os-release")); err != nil {
		t.Fatal(err)
	}

	// Kill the daemon: its FUSE mounts die with it.
	killDaemon(t, root)
	// The next command starts a new daemon, which restores the old mount.
	strata(t, root, "--fetch-timeout", "3s", "mount", "--plain-http", ref, dir2)
	for _, d := range []string{dir1, dir2} {
		b, err := os.ReadFile(filepath.Join(d, "etc/os-release"))
		if err != nil || !bytes.Contains(b, []byte("Debian")) {
			t.Fatalf("after a daemon crash and restart, %s: %v", d, err)
		}
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Count(string(b), filepath.Join(root, "layers")) != 1 {
		t.Errorf("want exactly one layer mount after restart:\n%s", grepLines(string(b), root))
	}

	// Registry outage.
	cached := filepath.Join(dir2, "etc/os-release")
	big := largestFiles(t, dir2, 1)[0]
	reg.cmd.Process.Kill()
	reg.cmd.Wait()
	if _, err := os.ReadFile(cached); err != nil {
		t.Fatalf("cached file unreadable with the registry down: %v", err)
	}
	start := time.Now()
	_, err := os.ReadFile(big)
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("uncached read with the registry down: err = %v, want EIO", err)
	}
	t.Logf("uncached read failed with EIO after %s (fetch bound 3s)", took.Round(time.Millisecond))
	if took > 15*time.Second {
		t.Fatalf("uncached read took %s to fail; the bound is 3s", took)
	}
	strata(t, root, "umount", dir1)
	strata(t, root, "umount", dir2)
}

// corruptingProxy forwards to a registry and flips a byte in every ranged
// (206) response, the way a broken cache or link would.
func corruptingProxy(t *testing.T, target string) (string, *atomic.Int64) {
	t.Helper()
	u, _ := url.Parse("http://" + target)
	var corrupted atomic.Int64
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		if resp.StatusCode != http.StatusPartialContent {
			return nil
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		// One byte in every 4 KiB, so that every frame of a response
		// (a read fetches several) is hit.
		for i := len(b) / 2 % 4096; i < len(b); i += 4096 {
			b[i] ^= 0xff
			corrupted.Add(1)
		}
		resp.Body = io.NopCloser(bytes.NewReader(b))
		return nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: rp}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), &corrupted
}

// TestNodeCorruptFrames: frames corrupted on the wire are detected and never
// served: reads fail with EIO.
func TestNodeCorruptFrames(t *testing.T) {
	requireRun(t)
	layout, rootfs, _ := debianPython(t)
	reg := startRegistry(t)
	pushLayout(t, layout, "latest", reg.Addr+"/debian/python:latest")
	proxy, corrupted := corruptingProxy(t, reg.Addr)
	root := nodeRoot(t)
	mnt := filepath.Join(t.TempDir(), "m")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { strataErr(root, "umount", mnt) })
	strata(t, root, "--fetch-timeout", "5s", "mount", "--plain-http", proxy+"/debian/python:latest", mnt)
	for _, f := range []string{"etc/os-release", "usr/bin/python3.11"} {
		got, err := os.ReadFile(filepath.Join(mnt, f))
		if err == nil {
			want, _ := os.ReadFile(filepath.Join(rootfs, f))
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: corrupted bytes were served", f)
			}
			t.Fatalf("%s: read succeeded through a corrupting proxy", f)
		}
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("%s: err = %v, want EIO", f, err)
		}
	}
	if corrupted.Load() == 0 {
		t.Fatal("the proxy corrupted nothing: the test did not test")
	}
	strata(t, root, "umount", mnt)
}
