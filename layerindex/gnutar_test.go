//go:build linux

package layerindex_test

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/layerindex"
)

// TestEquivalenceGNUTar extracts layers with GNU tar as root and checks
// that every file, attribute and link in the result is what the index
// says.
func TestEquivalenceGNUTar(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "tar")
	layers := map[string][]byte{ // the ones without a "./" entry leave the root alone
		"rich": richLayer(t),
		// GNU tar replaces a file by unlinking it, so the hardlink keeps
		// the first content, as in the index.
		"duplicates": tarOf(t, 0, reg("a", "v1"), hardlink("b", "a"), regBytes("a", []byte("version 2"), 0o600), dir("d/"), reg("d/f", "x"),
			withXattrs(reg("d/f", "again"), "user.x", "1")),
		"gnu-sparse": gnuSparseTar(t),
	}
	for name, layer := range layers {
		t.Run(name, func(t *testing.T) {
			x, data := mustBuild(t, layer)
			root := extract(t, layer)
			compareTree(t, x, data, root, name == "rich")
		})
	}
}

// extract runs GNU tar on layer into a new directory.
func extract(t *testing.T, layer []byte) string {
	t.Helper()
	tmp := t.TempDir()
	tarball := filepath.Join(tmp, "layer.tar")
	if err := os.WriteFile(tarball, layer, 0o644); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(tmp, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--warning=no-timestamp", "-xpf", tarball, "-C", root)
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	return root
}

// gnuSparseTar has GNU tar archive a sparse file (PAX sparse format 1.0).
func gnuSparseTar(t *testing.T) []byte {
	t.Helper()
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("start"), 0)
	f.WriteAt(bytes.Repeat([]byte("middle"), 1000), 3<<20)
	f.WriteAt([]byte("end"), 5<<20-3)
	f.Close()
	os.Chtimes(filepath.Join(src, "sparse"), epoch, epoch)
	os.WriteFile(filepath.Join(src, "plain"), []byte("plain"), 0o644)
	os.Chtimes(filepath.Join(src, "plain"), epoch, epoch)
	out, err := exec.Command("tar", "--sparse", "--format=posix", "--numeric-owner", "-cf", "-", "-C", src, "sparse", "plain").Output()
	if err != nil {
		t.Fatalf("tar -c: %v", err)
	}
	return out
}

func major(rdev uint64) uint32 { return uint32((rdev>>8)&0xfff | (rdev>>32)&^0xfff) }
func minor(rdev uint64) uint32 { return uint32(rdev&0xff | (rdev>>12)&^0xff) }

func listXattrs(t *testing.T, p string) []layerindex.Xattr {
	t.Helper()
	n, err := syscall.Listxattr(p, nil)
	if err != nil || n == 0 {
		return nil
	}
	buf := make([]byte, n)
	n, err = syscall.Listxattr(p, buf)
	if err != nil {
		t.Fatal(err)
	}
	var out []layerindex.Xattr
	for name := range strings.SplitSeq(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.") {
			continue // stripped by design
		}
		vn, err := syscall.Getxattr(p, name, nil)
		if err != nil {
			t.Fatal(err)
		}
		v := make([]byte, vn)
		vn, err = syscall.Getxattr(p, name, v)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, layerindex.Xattr{Name: name, Value: string(v[:vn])})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// compareTree compares the index with the tree extracted at root; the root
// directory's attributes only when the layer lists it.
func compareTree(t *testing.T, x *layerindex.Index, data []byte, root string, rootListed bool) {
	t.Helper()
	typeOf := map[uint32]layerindex.Type{
		syscall.S_IFREG: layerindex.TypeReg, syscall.S_IFDIR: layerindex.TypeDir, syscall.S_IFLNK: layerindex.TypeSymlink,
		syscall.S_IFCHR: layerindex.TypeChar, syscall.S_IFBLK: layerindex.TypeBlock, syscall.S_IFIFO: layerindex.TypeFIFO,
	}
	lstat := func(p string) *syscall.Stat_t {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(root, p), &st); err != nil {
			t.Fatalf("lstat: %v", err)
		}
		return &st
	}
	for i, e := range x.Entries {
		p := filepath.Join(root, e.Path)
		switch e.Type {
		case layerindex.TypeWhiteout:
			dir, name := filepath.Split(e.Path)
			if _, err := os.Lstat(filepath.Join(root, dir, ".wh."+name)); err != nil {
				t.Errorf("%s: whiteout marker missing: %v", e.Path, err)
			}
			continue
		case layerindex.TypeHardlink:
			if lstat(e.Path).Ino != lstat(e.Linkname).Ino {
				t.Errorf("%s: not the same inode as %s", e.Path, e.Linkname)
			}
			checkContent(t, x, data, e.Path, mustRead(t, p))
			continue
		}
		if i == 0 && !rootListed {
			continue
		}
		st := lstat(e.Path)
		if got := typeOf[st.Mode&syscall.S_IFMT]; got != e.Type {
			t.Errorf("%q: type %s, index says %s", e.Path, got, e.Type)
			continue
		}
		if e.Type != layerindex.TypeSymlink && st.Mode&0o7777 != e.Mode {
			t.Errorf("%q: mode %o, index says %o", e.Path, st.Mode&0o7777, e.Mode)
		}
		if st.Uid != e.UID || st.Gid != e.GID {
			t.Errorf("%q: owner %d:%d, index says %d:%d", e.Path, st.Uid, st.Gid, e.UID, e.GID)
		}
		if st.Mtim.Sec != e.ModTime || uint32(st.Mtim.Nsec) != e.ModNsec {
			t.Errorf("%q: mtime %d.%09d, index says %d.%09d", e.Path, st.Mtim.Sec, st.Mtim.Nsec, e.ModTime, e.ModNsec)
		}
		switch e.Type {
		case layerindex.TypeReg:
			checkContent(t, x, data, e.Path, mustRead(t, p))
			if want := x.Nlink(i); uint32(st.Nlink) != want {
				t.Errorf("%q: nlink %d, index says %d", e.Path, st.Nlink, want)
			}
		case layerindex.TypeDir:
			_, err := os.Lstat(filepath.Join(p, ".wh..wh..opq"))
			if e.Opaque != (err == nil) {
				t.Errorf("%q: opaque %v, but marker present: %v", e.Path, e.Opaque, err == nil)
			}
		case layerindex.TypeSymlink:
			if target, _ := os.Readlink(p); target != e.Linkname {
				t.Errorf("%q: target %q, index says %q", e.Path, target, e.Linkname)
			}
		case layerindex.TypeChar, layerindex.TypeBlock:
			if major(st.Rdev) != e.Devmajor || minor(st.Rdev) != e.Devminor {
				t.Errorf("%q: device %d,%d, index says %d,%d", e.Path, major(st.Rdev), minor(st.Rdev), e.Devmajor, e.Devminor)
			}
		}
		if e.Type == layerindex.TypeReg || e.Type == layerindex.TypeDir {
			if diff := cmp.Diff(e.Xattrs, listXattrs(t, p)); diff != "" {
				t.Errorf("%q: xattrs differ (-index +disk):\n%s", e.Path, diff)
			}
		}
	}
	// Nothing on disk that the index does not describe.
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		dir, base := filepath.Split(rel)
		switch {
		case base == ".wh..wh..opq":
			rel = strings.TrimSuffix(dir, "/")
		case strings.HasPrefix(base, ".wh."):
			rel = dir + strings.TrimPrefix(base, ".wh.")
		}
		if _, ok := x.Lookup(rel); !ok {
			t.Errorf("%q is on disk but not in the index", rel)
		}
		return nil
	})
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
