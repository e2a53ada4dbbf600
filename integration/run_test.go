package integration

import (
	"archive/tar"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
)

func requireRun(t *testing.T) {
	t.Helper()
	testenv.RequireFUSE(t)
	testenv.RequireTool(t, "runc", "skopeo")
}

// exitCode runs strata and returns stdout, stderr and the exit code.
func strataCode(t *testing.T, root string, args ...string) (string, string, int) {
	t.Helper()
	out, errOut, err := strataErr(root, args...)
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("strata %v: %v", args, err)
		}
		return out, errOut, ee.ExitCode()
	}
	return out, errOut, 0
}

// TestRunPython runs python3 from the Debian+python3 image lazily.
func TestRunPython(t *testing.T) {
	requireRun(t)
	layout, _, _ := debianPython(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/debian/python:latest"
	pushLayout(t, layout, "latest", ref)
	root := nodeRoot(t)

	out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref, "python3", "-c", `print("hello")`)
	if code != 0 || out != "hello\n" {
		t.Fatalf("run: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "lazy") {
		t.Errorf("stderr does not say the lazy mode was used: %s", errOut)
	}
	// Exit codes pass through.
	if _, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref, "sh", "-c", "exit 7"); code != 7 {
		t.Fatalf("exit code %d, want 7: %s", code, errOut)
	}
	// Overrides.
	out = strata(t, root, "run", "--rm", "--plain-http", "-e", "GREETING=hi", "-w", "/tmp", "-u", "nobody", ref,
		"sh", "-c", `echo "$GREETING $(pwd) $(id -u)"`)
	if strings.TrimSpace(out) != "hi /tmp 65534" {
		t.Errorf("env/workdir/user: %q", out)
	}
	out = strata(t, root, "run", "--rm", "--plain-http", "--entrypoint", "/bin/echo", ref, "from", "echo")
	if strings.TrimSpace(out) != "from echo" {
		t.Errorf("entrypoint: %q", out)
	}
	// Writes go to the container's own layer, not to the image.
	out = strata(t, root, "run", "--rm", "--plain-http", ref, "sh", "-c", "echo x > /etc/newfile && rm /etc/os-release && ls /etc/newfile")
	if strings.TrimSpace(out) != "/etc/newfile" {
		t.Errorf("write in container: %q", out)
	}
	out = strata(t, root, "run", "--rm", "--plain-http", ref, "sh", "-c", "test -e /etc/newfile || cat /etc/os-release | head -1")
	if !strings.Contains(out, "Debian") {
		t.Errorf("a container's writes leaked into the image: %q", out)
	}

	// Detached: ps, logs, stop, rm.
	id := strings.TrimSpace(strata(t, root, "run", "-d", "--plain-http", "--name", "sleeper", ref, "sh", "-c", "echo started; exec sleep 300"))
	if len(id) != 32 {
		t.Fatalf("run -d printed %q, want a container id", id)
	}
	if ps := strata(t, root, "ps"); !strings.Contains(ps, id[:12]) || !strings.Contains(ps, "running") {
		t.Fatalf("ps:\n%s", ps)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(strata(t, root, "logs", "sleeper"), "started") {
		if time.Now().After(deadline) {
			t.Fatal("logs never showed the output")
		}
		time.Sleep(100 * time.Millisecond)
	}
	strata(t, root, "stop", "-t", "2s", "sleeper")
	strata(t, root, "rm", "sleeper")
	if ps := strata(t, root, "ps", "-a"); strings.Contains(ps, id[:12]) {
		t.Fatalf("container still listed after rm:\n%s", ps)
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), filepath.Join(root, "containers")) {
		t.Fatalf("container mounts left behind")
	}
}

// TestRunHostileConfig: an image whose WORKDIR goes through a symlink to
// /proc/self/fd and a -v target through a symlink out of the rootfs must
// not touch the host.
func TestRunHostileConfig(t *testing.T) {
	requireRun(t)
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "busybox-static is not installed")
	}
	canary := filepath.Join(t.TempDir(), "canary")
	os.MkdirAll(canary, 0o755)
	tr, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Content: busybox, Mode: 0o755},
		{Name: "bin/sh", Type: tar.TypeSymlink, Linkname: "busybox"},
		{Name: "bin/touch", Type: tar.TypeSymlink, Linkname: "busybox"},
		{Name: "work", Type: tar.TypeSymlink, Linkname: "/proc/self/fd/3"},
		{Name: "escape", Type: tar.TypeSymlink, Linkname: canary},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
	})
	if err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "latest", ocilayout.Image{
		Layers: []ocilayout.Layer{ocilayout.GzipLayer(tr)},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh", "-c", "touch x"}, WorkingDir: "/work"},
	}); err != nil {
		t.Fatal(err)
	}
	reg := startRegistry(t)
	ref := reg.Addr + "/hostile/config:latest"
	pushLayout(t, layout, "latest", ref)
	root := nodeRoot(t)
	// Whatever runc does with the workdir, nothing may appear on the host.
	strataCode(t, root, "run", "--rm", "--plain-http", ref)
	src := t.TempDir()
	strataCode(t, root, "run", "--rm", "--plain-http", "-v", src+":/escape/sub", ref, "/bin/sh", "-c", "touch /escape/sub/x")
	if ents, _ := os.ReadDir(canary); len(ents) != 0 {
		t.Fatalf("the container wrote to the host through a symlink: %v", ents)
	}
}

// TestRunManyLayers runs an image of 100 layers lazily: the top layer's
// file wins, every layer's file is visible, a whiteout hides a lower file.
func TestRunManyLayers(t *testing.T) {
	requireRun(t)
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "busybox-static is not installed")
	}
	base, _ := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Content: busybox, Mode: 0o755},
		{Name: "bin/sh", Type: tar.TypeSymlink, Linkname: "busybox"},
		{Name: "hidden", Content: []byte("should be whited out\n")},
	})
	layers := []ocilayout.Layer{ocilayout.GzipLayer(base)}
	for i := 1; i < 100; i++ {
		entries := []ocilayout.Entry{
			{Name: "layers/", Type: tar.TypeDir},
			{Name: fmt.Sprintf("layers/%03d", i), Content: []byte(fmt.Sprint(i))},
			{Name: "top", Content: []byte(fmt.Sprint(i))},
		}
		if i == 50 {
			entries = append(entries, ocilayout.Entry{Name: ".wh.hidden"})
		}
		tr, err := ocilayout.Tar(entries)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, ocilayout.GzipLayer(tr))
	}
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "latest", ocilayout.Image{Layers: layers, Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh"}}}); err != nil {
		t.Fatal(err)
	}
	reg := startRegistry(t)
	ref := reg.Addr + "/many/layers:latest"
	pushLayout(t, layout, "latest", ref)
	root := nodeRoot(t)
	out := strata(t, root, "run", "--rm", "--plain-http", ref, "/bin/busybox", "sh", "-c",
		"cat /top; echo; /bin/busybox ls /layers | /bin/busybox wc -l; test -e /hidden && echo visible || echo hidden")
	if got := strings.Fields(out); len(got) != 3 || got[0] != "99" || got[1] != "99" || got[2] != "hidden" {
		t.Fatalf("100-layer image: %q", out)
	}
}

// TestRunTTY: -it gives the container a working terminal, with its output
// passed through.
func TestRunTTY(t *testing.T) {
	requireRun(t)
	testenv.RequireTool(t, "script")
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "busybox-static is not installed")
	}
	tr, _ := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Content: busybox, Mode: 0o755},
		{Name: "bin/sh", Type: tar.TypeSymlink, Linkname: "busybox"},
	})
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "latest", ocilayout.Image{Layers: []ocilayout.Layer{ocilayout.GzipLayer(tr)}, Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh"}}}); err != nil {
		t.Fatal(err)
	}
	reg := startRegistry(t)
	ref := reg.Addr + "/tty/busybox:latest"
	pushLayout(t, layout, "latest", ref)
	root := nodeRoot(t)
	inner := strataBin + " --root " + root + " run --rm -it --plain-http " + ref +
		` /bin/busybox sh -c "test -t 0 && test -t 1 && echo TTY-OK \$(/bin/busybox tty) \$TERM"`
	cmd := exec.Command("script", "-qefc", inner, "/dev/null")
	cmd.Stdin = strings.NewReader("")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "TTY-OK /dev/pts/") || !strings.Contains(string(out), "xterm") {
		t.Fatalf("run -it under a terminal: %v\n%s", err, out)
	}
}

// TestDamagedIndex: a layer index the node saved (without fsync) that a
// crash damaged is detected and fetched again, not used.
func TestDamagedIndex(t *testing.T) {
	requireRun(t)
	layout, _ := busyboxLayout(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/damaged/busybox:latest"
	pushLayout(t, layout, "hello", ref)
	root := nodeRoot(t)
	strata(t, root, "pull", "--plain-http", ref)
	indexes, _ := filepath.Glob(filepath.Join(root, "layers", "*", "index"))
	if len(indexes) == 0 {
		t.Fatal("no saved index after a pull")
	}
	// The daemon dies with the machine; the next command starts another.
	killDaemon(t, root)
	for _, p := range indexes {
		if err := os.WriteFile(p, []byte("damaged"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref, "/bin/busybox", "echo", "hello")
	if code != 0 || out != "hello\n" {
		t.Fatalf("run with damaged saved indexes: code %d stdout %q stderr %s", code, out, errOut)
	}
	for _, p := range indexes {
		if b, _ := os.ReadFile(p); string(b) == "damaged" {
			t.Errorf("%s was not fetched again", p)
		}
	}

	// A union mount restored by a new daemon after a crash that damaged
	// the saved indexes fetches them again.
	dir := filepath.Join(t.TempDir(), "union")
	os.MkdirAll(dir, 0o755)
	strata(t, root, "mount", "--plain-http", ref, dir)
	t.Cleanup(func() { strataErr(root, "umount", dir) })
	killDaemon(t, root)
	for _, p := range indexes {
		os.WriteFile(p, []byte("damaged"), 0o644)
	}
	// The next command starts a new daemon, which restores the mount.
	dir2 := filepath.Join(t.TempDir(), "union2")
	os.MkdirAll(dir2, 0o755)
	strata(t, root, "mount", "--plain-http", ref, dir2)
	t.Cleanup(func() { strataErr(root, "umount", dir2) })
	if b, err := os.ReadFile(filepath.Join(dir, "bin", "busybox")); err != nil || len(b) == 0 {
		t.Errorf("restored union: read bin/busybox: %v", err)
	}
}
