package integration

import (
	"archive/tar"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestViewNoSuidNoDev: `strata mount` puts a view of an image at a path of
// the user's choosing, where any user may reach it: its setuid binaries
// and device nodes must have no effect there. Before, the view was an
// overlay mounted with neither nosuid nor nodev, so any user could run a
// setuid-root binary of the image as root (device nodes were refused
// already, through the layers' FUSE mounts below, which are nodev).
func TestViewNoSuidNoDev(t *testing.T) {
	requireRun(t)
	testenv.RequireRoot(t)
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "test needs a static /bin/busybox (busybox-static): "+err.Error())
	}
	l1, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Mode: 0o755, Content: bb},
	})
	if err != nil {
		t.Fatal(err)
	}
	l2, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/suid", Mode: 0o4755, Content: []byte("#!/bin/sh\n")},
		{Name: "dev/", Type: tar.TypeDir},
		{Name: "dev/zero0", Type: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 5}, // /dev/zero
	})
	if err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "v", ocilayout.Image{
		Layers: []ocilayout.Layer{ocilayout.GzipLayer(l1), ocilayout.GzipLayer(l2)},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/busybox", "true"}},
	}); err != nil {
		t.Fatal(err)
	}
	reg := startRegistry(t)
	ref := reg.Addr + "/perm/view:1"
	pushLayout(t, layout, "v", ref)
	root := nodeRoot(t)
	parent, err := os.MkdirTemp("", "strata-view-") // reachable by others, as a user's own path is
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(parent)
	os.Chmod(parent, 0o755)
	view := filepath.Join(parent, "view")
	os.Mkdir(view, 0o755)
	strata(t, root, "mount", "--plain-http", ref, view)
	defer strata(t, root, "umount", view)

	var st unix.Statfs_t
	if err := unix.Statfs(view, &st); err != nil {
		t.Fatal(err)
	}
	if ents, err := os.ReadDir(filepath.Join(view, "dev")); err != nil || len(ents) != 1 {
		t.Fatalf("view's /dev: %v %v", ents, err)
	}
	if st.Flags&unix.ST_NOSUID == 0 || st.Flags&unix.ST_NODEV == 0 {
		t.Errorf("view mounted with flags %#x, want nosuid and nodev", st.Flags)
	}
	if fi, err := os.Stat(filepath.Join(view, "bin/suid")); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		t.Fatalf("the image's setuid file in the view: %v %v", fi, err)
	}
	// A device node of the image cannot be opened through the view, by
	// root or anyone (nodev: EACCES).
	cmd := exec.Command(filepath.Join(view, "bin/busybox"), "cat", filepath.Join(view, "dev/zero0"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Permission denied") {
		t.Errorf("user nobody opened the image's device node: %v %s", err, out)
	}
	if _, err := os.Open(filepath.Join(view, "dev/zero0")); !os.IsPermission(err) {
		t.Errorf("open of the image's device node by root: %v, want permission denied", err)
	}
}
