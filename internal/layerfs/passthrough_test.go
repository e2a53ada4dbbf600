package layerfs_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/testenv"
)

func putFile(t testing.TB, c *cache.Cache, b []byte) {
	t.Helper()
	if err := c.PutFile(context.Background(), digest.FromBytes(b), int64(len(b)), bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
}

// readAll reads an open file with pread, as passthrough would serve it.
func readAll(t *testing.T, fh *os.File) []byte {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(fh, 0, 1<<40))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestPassthrough(t *testing.T) {
	testenv.RequireFUSE(t)
	small, lib, lib2 := text(1, 20<<10), random(2, 3<<20), random(3, 2<<20)
	ix, data := build(t, tarOf(t,
		file("small.py", 0o644, small),
		file("lib.so", 0o755, lib),
		file("lib2.so", 0o755, lib2),
		hardlink("small-link.py", "small.py"),
	))
	src := &memSource{data: data}
	c := openCache(t, t.TempDir(), 0)
	f, mnt := mount(t, ix, src, c, layerfs.Options{})

	// A small file is put whole into the cache when opened, and opened
	// with passthrough: reading it never enters the daemon.
	fh, err := os.Open(filepath.Join(mnt, "small.py"))
	if err != nil {
		t.Fatal(err)
	}
	s := f.Stats()
	if s.PassthroughOpens == 0 {
		fh.Close()
		if s.Materialized == 0 {
			t.Fatalf("small file not materialized: %+v", s)
		}
		testenv.Unavailable(t, "the kernel does not take FUSE passthrough backing files")
	}
	if got := readAll(t, fh); !bytes.Equal(got, small) {
		t.Errorf("small.py through passthrough: wrong content (%d bytes)", len(got))
	}
	// Its other name is the same inode, with the same backing file.
	fh2, err := os.Open(filepath.Join(mnt, "small-link.py"))
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, fh2); !bytes.Equal(got, small) {
		t.Errorf("small-link.py: wrong content")
	}
	fh2.Close()
	fh.Close()
	s = f.Stats()
	if s.ServedReads != 0 || s.PassthroughOpens != 2 || s.Materialized != 1 {
		t.Errorf("stats %+v: want 2 passthrough opens, 1 file materialized, no served reads", s)
	}

	// A large file is served until it is whole in the cache (put there by
	// a background fetch, say), then opened with passthrough; mmap works.
	putFile(t, c, lib)
	fh, err = os.Open(filepath.Join(mnt, "lib.so"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(fh.Fd()), 0, len(lib), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	if !bytes.Equal(m, lib) {
		t.Errorf("lib.so mapped through passthrough: wrong content")
	}
	unix.Munmap(m)
	if got := readAll(t, fh); !bytes.Equal(got, lib) {
		t.Errorf("lib.so through passthrough: wrong content")
	}
	fh.Close()
	if s := f.Stats(); s.ServedReads != 0 || s.PassthroughOpens != 3 || s.BytesFetched > ix.DataSize/4 {
		t.Errorf("stats %+v: want 3 passthrough opens, no served reads, little fetched", s)
	}

	// An inode open with served reads is not opened with passthrough
	// until it is closed: the kernel refuses to mix the two.
	served, err := os.Open(filepath.Join(mnt, "lib2.so"))
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, served); !bytes.Equal(got, lib2) {
		t.Errorf("lib2.so served: wrong content")
	}
	putFile(t, c, lib2)
	again, err := os.Open(filepath.Join(mnt, "lib2.so"))
	if err != nil {
		t.Fatalf("second open while served: %v", err)
	}
	if got := readAll(t, again); !bytes.Equal(got, lib2) {
		t.Errorf("lib2.so second open: wrong content")
	}
	again.Close()
	served.Close()
	if s := f.Stats(); s.PassthroughOpens != 3 || s.ServedOpens != 2 {
		t.Errorf("stats %+v: want 2 served opens of lib2.so", s)
	}
	// Once closed (the kernel releases asynchronously), it is.
	pinned := c.Stats().Pinned
	fh, err = os.Open(filepath.Join(mnt, "lib2.so"))
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, fh); !bytes.Equal(got, lib2) {
		t.Errorf("lib2.so: wrong content")
	}
	if c.Stats().Pinned <= pinned && f.Stats().PassthroughOpens == 3 {
		t.Logf("lib2.so still served: the kernel had not released the served handle yet")
	}
	fh.Close()
}

func TestPassthroughDisabled(t *testing.T) {
	small := text(1, 20<<10)
	ix, data := build(t, tarOf(t, file("small.py", 0o644, small)))
	c := openCache(t, t.TempDir(), 0)
	putFile(t, c, small)
	f, mnt := mount(t, ix, &memSource{data: data}, c, layerfs.Options{DisablePassthrough: true})
	if got := readFile(t, filepath.Join(mnt, "small.py")); !bytes.Equal(got, small) {
		t.Errorf("wrong content")
	}
	if s := f.Stats(); s.PassthroughOpens != 0 || s.ServedReads == 0 {
		t.Errorf("stats %+v: want served reads only", s)
	}
}

func TestSetReadahead(t *testing.T) {
	ix, data := build(t, tarOf(t, file("f", 0o644, text(2, 300<<10))))
	testenv.RequireFUSE(t)
	f, err := layerfs.New(ix, &memSource{data: data}, nil, layerfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dir := t.TempDir()
	srv, err := f.Mount(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	sysfs := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	old, err := srv.SetReadahead(32)
	if err != nil {
		unmount(t, srv.Unmount, dir)
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(sysfs); strings.TrimSpace(string(b)) != "32" || old <= 0 {
		t.Errorf("after SetReadahead(32): %s says %q; the value before was %d", sysfs, b, old)
	}
	if prev, err := srv.SetReadahead(old); err != nil || prev != 32 {
		t.Errorf("SetReadahead back: %d, %v", prev, err)
	}
	unmount(t, srv.Unmount, dir)
	if _, err := srv.SetReadahead(32); err == nil {
		t.Error("SetReadahead after Unmount succeeded; the device number may belong to another mount by then")
	}
}
