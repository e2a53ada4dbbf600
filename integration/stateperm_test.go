package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/strata-oci/strata/internal/testenv"
)

// TestStateNotTraversable: with an image's layers mounted on a node, a
// user other than root cannot reach anything below the node's root (the
// layers' files, setuid binaries and device nodes among them: the class of
// CVE-2021-41091), while root's containers run as before.
func TestStateNotTraversable(t *testing.T) {
	requireRun(t)
	testenv.RequireRoot(t)
	layout, _ := busyboxLayout(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/perm/hello:1"
	pushLayout(t, layout, "hello", ref)
	root := nodeRoot(t)
	os.MkdirAll(root, 0o755) // a root made by an older strata
	view := t.TempDir()
	strata(t, root, "mount", "--plain-http", ref, view)
	defer strata(t, root, "umount", view)

	// A file of a lazily mounted layer, below the root.
	var inside string
	filepath.WalkDir(filepath.Join(root, "layers"), func(p string, d os.DirEntry, err error) error {
		if err == nil && inside == "" && !d.IsDir() && strings.Contains(p, "/mnt/") {
			inside = p
		}
		return nil
	})
	if inside == "" {
		t.Fatal("no file found below the node root's layers")
	}
	if fi, err := os.Stat(root); err != nil || fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("node root %s mode %v, want no access for group and others", root, fi.Mode().Perm())
	}
	cmd := exec.Command("cat", inside)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Permission denied") {
		t.Errorf("user nobody read %s: %v %s", inside, err, out)
	}
	// Root's containers are unaffected.
	if out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref); code != 0 || out != "hello from a layer\n" {
		t.Errorf("run: %d %q %s", code, out, errOut)
	}
}
