package layerfs_test

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/layerindex"
)

// everyType is a layer with every kind of entry a layer tar can hold.
func everyType() []ent {
	long := strings.Repeat("n", 255)
	var deepDirs []ent
	deep := ""
	for i := range 13 {
		deep += map[bool]string{true: "deep/", false: "abcdefghij/"}[i == 0]
		deepDirs = append(deepDirs, dir(deep, 0o750).mtime(time.Unix(int64(1500000000+i), int64(i))))
	}
	ents := []ent{
		dir("./", 0o755).mtime(time.Unix(1600000000, 5)),
		dir("etc/", 0o755).xattr("user.dirattr", "d"),
		file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n")).xattr("user.comment", "hello", "user.bin", "\x00\x01\xff"),
		file("etc/shadow", 0o640, []byte("root:*:19000:0:99999:7:::\n")).owner(0, 42),
		// GNU tar sets a directory's times once it has gone past it: list
		// entries depth first, as layer tars do.
		dir("bin/", 0o755),
		file("bin/su", 0o4755, text(1, 3000)),
		file("bin/sg", 0o2711, text(2, 100)).owner(0, 42),
		file("bin/sticky", 0o1755, text(3, 10)),
		hardlink("bin/hard2", "etc/passwd"),
		file("big.bin", 0o644, append(random(1, 3<<20), text(4, 300<<10)...)).owner(1000, 1000),
		file("empty", 0o600, nil).owner(65534, 65534),
		hardlink("hard", "etc/passwd"),
		symlink("link", "etc/passwd"),
		symlink("dangling", "/does/not/exist"),
		symlink("up", "bin/../etc"),
		dir("dev/", 0o755),
		device(tar.TypeChar, "dev/null", 0o666, 1, 3),
		device(tar.TypeChar, "dev/bignum", 0o600, 259, 700000),
		device(tar.TypeBlock, "dev/loop0", 0o660, 7, 0).owner(0, 6),
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "fifo", Mode: 0o620, ModTime: t0}},
		dir("tmp/", 0o1777),
		dir("times/", 0o755).mtime(time.Unix(0, 0)),
		file("times/before-epoch", 0o644, []byte("old")).mtime(time.Unix(-1000000000, 999999999)),
		file("times/far-future", 0o644, []byte("new")).mtime(time.Unix(7258118400, 1)),
		file("times/epoch", 0o644, []byte("zero")).mtime(time.Unix(0, 0)),
		dir("long/", 0o755),
		file("long/"+long, 0o644, []byte("long name")),
		file(deep+"leaf", 0o444, text(5, 5000)),
		// Whiteouts and an opaque directory.
		file(".wh.gone", 0o644, nil),
		dir("opq/", 0o755),
		file("opq/.wh..wh..opq", 0o644, nil),
		file("opq/kept", 0o644, []byte("kept")),
	}
	return append(ents, deepDirs...)
}

// fileInfo is what the comparison of two trees looks at.
type fileInfo struct {
	Type   string
	Perm   uint32 // with setuid, setgid, sticky
	UID    uint32
	GID    uint32
	Nlink  uint64
	Size   int64 // regular files and symlinks
	Mtime  time.Time
	Target string
	Rdev   [2]uint32
	Xattrs map[string]string
	SHA256 string
	Links  string // the names of a file with more than one link
}

func walkTree(t *testing.T, root string, skip func(rel string) bool) map[string]fileInfo {
	t.Helper()
	out := map[string]fileInfo{}
	inodes := map[uint64][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if skip(rel) {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		fi := fileInfo{
			Type:  typeName(st.Mode),
			Perm:  st.Mode & 0o7777,
			UID:   st.Uid,
			GID:   st.Gid,
			Nlink: st.Nlink,
			Mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			fi.SHA256, fi.Size = hex.EncodeToString(sum[:]), st.Size
			if int64(len(b)) != st.Size {
				t.Errorf("%s: read %d bytes, stat says %d", rel, len(b), st.Size)
			}
			if st.Nlink > 1 {
				inodes[st.Ino] = append(inodes[st.Ino], rel)
			}
		case unix.S_IFLNK:
			fi.Target, err = os.Readlink(p)
			if err != nil {
				return err
			}
			fi.Size = st.Size
		case unix.S_IFCHR, unix.S_IFBLK:
			fi.Rdev = [2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)}
		}
		fi.Xattrs = xattrs(t, p)
		out[rel] = fi
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	for _, names := range inodes {
		sort.Strings(names)
		for _, n := range names {
			fi := out[n]
			fi.Links = strings.Join(names, " ")
			out[n] = fi
		}
	}
	return out
}

func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "reg"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFCHR:
		return "char"
	case unix.S_IFBLK:
		return "block"
	case unix.S_IFIFO:
		return "fifo"
	}
	return fmt.Sprintf("mode %o", mode)
}

func xattrs(t *testing.T, p string) map[string]string {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var out map[string]string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		k, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[name] = string(v[:k])
	}
	return out
}

// TestTreeMatchesTar mounts a layer and compares it with what GNU tar
// extracts from the same tar as root.
func TestTreeMatchesTar(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireTool(t, "tar")
	layer := tarOf(t, everyType()...)
	ix, data := build(t, layer)
	src := &memSource{data: data}
	f, mnt := mount(t, ix, src, openCache(t, t.TempDir(), 0), layerfs.Options{})

	// GNU tar's view.
	ref := t.TempDir()
	tarFile := filepath.Join(t.TempDir(), "layer.tar")
	if err := os.WriteFile(tarFile, layer, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", tarFile, "-C", ref)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}

	// Metadata first: mounting and walking the tree (stat, readdir,
	// readlink, xattrs) fetches nothing.
	isWhiteout := func(rel string) bool { return strings.Contains(rel, ".wh.") }
	isMarker := func(rel string) bool { return rel == "gone" }
	var st unix.Stat_t
	filepath.WalkDir(mnt, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			unix.Lstat(p, &st)
			xattrs(t, p)
		}
		return nil
	})
	if s := f.Stats(); s.BytesFetched != 0 {
		t.Errorf("walking the metadata fetched %d bytes, want 0", s.BytesFetched)
	}

	want := walkTree(t, ref, isWhiteout)
	got := walkTree(t, mnt, isMarker)
	// The overlay representation of the markers instead of GNU tar's.
	if fi := got["opq"]; fi.Xattrs["trusted.overlay.opaque"] != "y" {
		t.Errorf("opq: xattrs %v, want trusted.overlay.opaque=y", fi.Xattrs)
	} else {
		delete(fi.Xattrs, "trusted.overlay.opaque")
		if len(fi.Xattrs) == 0 {
			fi.Xattrs = nil
		}
		got["opq"] = fi
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("mounted tree differs from GNU tar's extraction (-tar +mount):\n%s", diff)
	}
	if len(want) < 30 {
		t.Errorf("only %d entries compared", len(want))
	}

	// The whiteout is a character device 0/0.
	if err := unix.Lstat(filepath.Join(mnt, "gone"), &st); err != nil {
		t.Fatalf("whiteout: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("whiteout: mode %o rdev %d, want a character device 0/0", st.Mode, st.Rdev)
	}

	// Inode numbers are stable and hardlinks share one.
	var a, b unix.Stat_t
	unix.Lstat(filepath.Join(mnt, "hard"), &a)
	unix.Lstat(filepath.Join(mnt, "etc/passwd"), &b)
	if a.Ino != b.Ino || a.Nlink != 3 {
		t.Errorf("hardlink: ino %d vs %d, nlink %d; want one inode with 3 links", a.Ino, b.Ino, a.Nlink)
	}

	// Readdir lists in index order.
	for _, d := range []string{"", "bin", "dev", "times"} {
		i, _ := ix.Lookup(d)
		var names []string
		for _, c := range ix.Children(i) {
			names = append(names, filepath.Base(ix.Entries[c].Path))
		}
		fh, err := os.Open(filepath.Join(mnt, d))
		if err != nil {
			t.Fatal(err)
		}
		listed, err := fh.Readdirnames(-1)
		fh.Close()
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(names, listed); diff != "" {
			t.Errorf("readdir %q (-index +listed):\n%s", d, diff)
		}
	}

	// Read-only.
	if err := os.WriteFile(filepath.Join(mnt, "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("creating a file: %v, want EROFS", err)
	}
	if _, err := os.OpenFile(filepath.Join(mnt, "etc/passwd"), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("opening for writing: %v, want EROFS", err)
	}
	if err := unix.Lsetxattr(filepath.Join(mnt, "etc/passwd"), "user.x", []byte("1"), 0); err == nil {
		t.Errorf("setxattr succeeded on a read-only mount")
	}
	if _, err := unix.Lgetxattr(filepath.Join(mnt, "etc/passwd"), "user.none", make([]byte, 10)); !errors.Is(err, unix.ENODATA) {
		t.Errorf("getxattr of a missing xattr: %v, want ENODATA", err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "no/such")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stat of a missing path: %v", err)
	}

	// The mount shows what it is.
	info := mountInfo(t, mnt)
	for _, w := range []string{" ro,", "nosuid", "nodev", "fuse.strata-" + ix.Layer.Encoded(), " strata ", "allow_other", "default_permissions"} {
		if !strings.Contains(info, w) {
			t.Errorf("mountinfo %q lacks %q", info, w)
		}
	}
}

func mountInfo(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return line
		}
	}
	t.Fatalf("%s not in mountinfo", dir)
	return ""
}

// TestReadFetchesLittle reads one small file of a big layer.
func TestReadFetchesLittle(t *testing.T) {
	var ents []ent
	for i := range 60 {
		ents = append(ents, file(filepath.Join("lib", strings.Repeat("x", i%5)+string(rune('a'+i%26))+"-"+strconv.Itoa(i)), 0o644, random(i, 200<<10)))
		if i == 30 {
			ents = append(ents, file("lib/small.txt", 0o644, []byte("hello, world\n")))
		}
	}
	ix, data := build(t, tarOf(t, ents...))
	src := &memSource{data: data}
	for _, tc := range []struct {
		name        string
		passthrough bool
		window      int64
	}{{"passthrough", true, 0}, {"served", false, 0}, {"no window", true, -1}} {
		t.Run(tc.name, func(t *testing.T) {
			src.bytes.Store(0)
			f, mnt := mount(t, ix, src, openCache(t, t.TempDir(), 0), layerfs.Options{DisablePassthrough: !tc.passthrough, MissWindow: tc.window})
			if got := readFile(t, filepath.Join(mnt, "lib/small.txt")); string(got) != "hello, world\n" {
				t.Fatalf("small.txt = %q", got)
			}
			s := f.Stats()
			if s.BytesFetched != src.bytes.Load() {
				t.Errorf("Stats.BytesFetched = %d, the source served %d", s.BytesFetched, src.bytes.Load())
			}
			// With the default miss window, the frames of the 1 MiB of the
			// stream around the file (the data is incompressible); without,
			// the frame holding the file and at most its neighbour.
			limit := int64(1<<20 + 2*layerindex.FrameSize + 4096)
			frames := int64(1<<20/layerindex.FrameMinCut + 2)
			if tc.window < 0 {
				limit, frames = 2*layerindex.FrameSize+4096, 2
			}
			if s.BytesFetched == 0 || s.BytesFetched > limit {
				t.Errorf("reading 13 bytes fetched %d of %d bytes (limit %d)", s.BytesFetched, ix.DataSize, limit)
			}
			if s.FramesFetched > frames {
				t.Errorf("fetched %d frames, want at most %d", s.FramesFetched, frames)
			}
			if tc.passthrough && s.PassthroughOpens != 1 {
				t.Errorf("PassthroughOpens = %d, want 1", s.PassthroughOpens)
			}
		})
	}
}

// TestOverlay stacks two layer mounts with overlayfs.
func TestOverlay(t *testing.T) {
	testenv.RequireFUSE(t)
	lower := tarOf(t,
		dir("a/", 0o755), file("a/x", 0o644, []byte("x")), file("a/y", 0o644, []byte("y")),
		dir("d/", 0o755), file("d/keep", 0o644, []byte("lower keep")), dir("d/inner/", 0o755), file("d/inner/z", 0o644, []byte("z")),
		file("f", 0o644, []byte("lower f")), file("g", 0o644, text(1, 100<<10)).xattr("user.g", "lower"),
		dir("w/", 0o755), file("w/file", 0o644, []byte("w")),
	)
	upper := tarOf(t,
		dir("a/", 0o755), file("a/.wh.x", 0o644, nil),
		dir("d/", 0o755), file("d/.wh..wh..opq", 0o644, nil), file("d/new", 0o644, []byte("upper new")),
		file("f", 0o644, []byte("upper f")),
		file(".wh.w", 0o644, nil),
	)
	ixl, dl := build(t, lower)
	ixu, du := build(t, upper)
	c := openCache(t, t.TempDir(), 0)
	_, ml := mount(t, ixl, &memSource{data: dl}, c, layerfs.Options{})
	_, mu := mount(t, ixu, &memSource{data: du}, c, layerfs.Options{})

	work := t.TempDir()
	upperDir, workDir, merged := filepath.Join(work, "upper"), filepath.Join(work, "work"), filepath.Join(work, "merged")
	for _, d := range []string{upperDir, workDir, merged} {
		os.Mkdir(d, 0o755)
	}
	mountPoints.Store(merged, true)
	opts := "lowerdir=" + mu + ":" + ml + ",upperdir=" + upperDir + ",workdir=" + workDir
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		if errors.Is(err, unix.ENODEV) {
			testenv.Unavailable(t, "overlayfs is not available")
		}
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() { unmount(t, func() error { return unix.Unmount(merged, 0) }, merged) })

	list := func(d string) []string {
		es, err := os.ReadDir(filepath.Join(merged, d))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range es {
			names = append(names, e.Name())
		}
		return names
	}
	checks := []struct {
		dir  string
		want []string
	}{
		{"", []string{"a", "d", "f", "g"}}, // w is whited out
		{"a", []string{"y"}},               // a/x is whited out
		{"d", []string{"new"}},             // d is opaque
	}
	for _, c := range checks {
		if diff := cmp.Diff(c.want, list(c.dir)); diff != "" {
			t.Errorf("merged %q (-want +got):\n%s", c.dir, diff)
		}
	}
	for _, p := range []string{"a/x", "d/keep", "d/inner", "d/inner/z", "w", "w/file"} {
		if _, err := os.Lstat(filepath.Join(merged, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: %v, want it hidden", p, err)
		}
	}
	for p, want := range map[string]string{"f": "upper f", "d/new": "upper new", "a/y": "y"} {
		if got := readFile(t, filepath.Join(merged, p)); string(got) != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}

	// Writing copies a lower file up, with its xattrs; the layers do not change.
	g := filepath.Join(merged, "g")
	fh, err := os.OpenFile(g, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatalf("open for append: %v", err)
	}
	fh.Write([]byte("more"))
	fh.Close()
	if got := readFile(t, g); string(got) != string(text(1, 100<<10))+"more" {
		t.Errorf("copied-up g has %d bytes", len(got))
	}
	if v, err := unix.Lgetxattr(g, "user.g", make([]byte, 10)); err != nil || v != 5 {
		t.Errorf("copied-up g lost its xattr: %d, %v", v, err)
	}
	if got := readFile(t, filepath.Join(ml, "g")); len(got) != 100<<10 {
		t.Errorf("the lower layer changed: %d bytes", len(got))
	}
	if err := os.Remove(filepath.Join(merged, "a/y")); err != nil {
		t.Errorf("remove a/y: %v", err)
	}
	if diff := cmp.Diff([]string(nil), list("a")); diff != "" {
		t.Errorf("after removing a/y (-want +got):\n%s", diff)
	}
}

// TestProgramsPrefetchedWhole: reading the head of an ELF file (exec, the
// loader) fetches the whole file at once; other files are fetched as read.
func TestProgramsPrefetchedWhole(t *testing.T) {
	elf := append([]byte("\x7fELF"), random(1, 3<<20)...)
	data := random(2, 3<<20)
	ix, blob := build(t, tarOf(t, file("usr/bin/prog", 0o755, elf), file("usr/share/data", 0o644, data)))
	src := &memSource{data: blob}
	f, mnt := mount(t, ix, src, openCache(t, t.TempDir(), 0), layerfs.Options{MissWindow: -1, DisablePassthrough: true})
	head := func(name string) {
		fd, err := os.Open(filepath.Join(mnt, name))
		if err != nil {
			t.Fatal(err)
		}
		defer fd.Close()
		b := make([]byte, 64)
		if _, err := fd.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
	}
	head("usr/share/data")
	time.Sleep(200 * time.Millisecond)
	if s := f.Stats(); s.Programs != 0 || s.BytesFetched > 2*layerindex.FrameSize+4096 {
		t.Errorf("a data file's head: %+v", s)
	}
	before := f.Stats().BytesFetched
	head("usr/bin/prog")
	deadline := time.Now().Add(5 * time.Second)
	for f.Stats().BytesFetched-before < int64(len(elf)) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s := f.Stats(); s.Programs != 1 || s.BytesFetched-before < int64(len(elf)) {
		t.Errorf("an ELF file's head fetched %d bytes of %d: %+v", s.BytesFetched-before, len(elf), s)
	}
	// The whole program is now read without another request.
	reqs := src.requests.Load()
	if got := readFile(t, filepath.Join(mnt, "usr/bin/prog")); !bytes.Equal(got, elf) {
		t.Fatal("program content differs")
	}
	if n := src.requests.Load() - reqs; n != 0 {
		t.Errorf("reading the prefetched program made %d requests", n)
	}
}
