package unpack

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/testenv"
)

// TestLsetxattratFallback checks both ways of setting an xattr on a
// symlink and a fifo without following: setxattrat, and the /proc/self/fd
// path used on kernels before 6.13.
func TestLsetxattratFallback(t *testing.T) {
	testenv.RequireRoot(t)
	for _, fallback := range []bool{false, true} {
		dir := t.TempDir()
		target := filepath.Join(dir, "target")
		if err := os.WriteFile(target, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("target", filepath.Join(dir, "link")); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o600); err != nil {
			t.Fatal(err)
		}
		fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		noSetxattrat.Store(fallback)
		for _, name := range []string{"link", "fifo"} {
			if err := lsetxattrat(fd, name, "trusted.test", []byte(name)); err != nil {
				t.Fatalf("fallback=%v: lsetxattrat %s: %v", fallback, name, err)
			}
			buf := make([]byte, 64)
			n, err := unix.Lgetxattr(filepath.Join(dir, name), "trusted.test", buf)
			if err != nil || string(buf[:n]) != name {
				t.Errorf("fallback=%v: %s has trusted.test=%q (%v)", fallback, name, buf[:max(n, 0)], err)
			}
		}
		if _, err := unix.Getxattr(target, "trusted.test", nil); err != unix.ENODATA {
			t.Errorf("fallback=%v: the symlink's target got the xattr (%v)", fallback, err)
		}
	}
	noSetxattrat.Store(false)
}
