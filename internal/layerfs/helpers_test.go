package layerfs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/layerindex"
)

// TestMain fails the run when a test leaves a mount behind.
func TestMain(m *testing.M) {
	code := m.Run()
	if leaks := leakedMounts(); len(leaks) > 0 {
		fmt.Fprintf(os.Stderr, "mounts left behind:\n%s\n", strings.Join(leaks, "\n"))
		code = 1
	}
	os.Exit(code)
}

// mountPoints holds every directory the tests mount something on.
var mountPoints sync.Map

// leakedMounts lists the lines of /proc/self/mountinfo for mount points
// of these tests. (Other packages' tests may be mounting things at the
// same time: only ours count.)
func leakedMounts() []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return []string{err.Error()}
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			if _, ours := mountPoints.Load(f[4]); ours {
				out = append(out, line)
			}
		}
	}
	return out
}

// An ent is one tar entry to write.
type ent struct {
	hdr  tar.Header
	body []byte
}

var t0 = time.Unix(1700000000, 123456789)

func dir(name string, mode int64) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: t0}}
}

func file(name string, mode int64, body []byte) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: t0}, body: body}
}

func symlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: t0}}
}

func hardlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, ModTime: t0}}
}

func device(typ byte, name string, mode, major, minor int64) ent {
	return ent{hdr: tar.Header{Typeflag: typ, Name: name, Mode: mode, Devmajor: major, Devminor: minor, ModTime: t0}}
}

func (e ent) owner(uid, gid int) ent {
	e.hdr.Uid, e.hdr.Gid = uid, gid
	return e
}

func (e ent) mtime(t time.Time) ent {
	e.hdr.ModTime = t
	return e
}

func (e ent) xattr(kv ...string) ent {
	if e.hdr.PAXRecords == nil {
		e.hdr.PAXRecords = map[string]string{}
	}
	for i := 0; i < len(kv); i += 2 {
		e.hdr.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return e
}

// tarOf writes a PAX tar (nanosecond times, xattrs) of ents.
func tarOf(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// build expands a layer tar.
func build(t testing.TB, layer []byte) (*layerindex.Index, []byte) {
	t.Helper()
	var data bytes.Buffer
	ix, err := layerindex.Build(context.Background(), bytes.NewReader(layer), &data, layerindex.Options{})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return ix, data.Bytes()
}

// random returns n pseudo-random, incompressible bytes.
func random(seed, n int) []byte {
	r := rand.New(rand.NewPCG(uint64(seed), 7))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// text returns n compressible bytes.
func text(seed, n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %d of file %d\n", i, seed)
	}
	return b.Bytes()[:n]
}

// memSource is the data blob in memory. It counts what is read and can
// fail, corrupt or stall requests.
type memSource struct {
	data []byte

	bytes, requests atomic.Int64

	mu sync.Mutex
	// fault, when set, decides the fate of a request: it returns an error
	// to fail it, or nil; it may modify b to corrupt it, and block.
	fault func(ctx context.Context, off, n int64, b []byte) error
}

func (s *memSource) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	if off < 0 || n < 0 || off+n > int64(len(s.data)) {
		return nil, fmt.Errorf("range %d+%d outside the blob of %d bytes", off, n, len(s.data))
	}
	b := append([]byte(nil), s.data[off:off+n]...)
	s.mu.Lock()
	fault := s.fault
	s.mu.Unlock()
	if fault != nil {
		if err := fault(ctx, off, n, b); err != nil {
			return nil, err
		}
	}
	s.requests.Add(1)
	s.bytes.Add(n)
	return b, nil
}

func (s *memSource) setFault(f func(ctx context.Context, off, n int64, b []byte) error) {
	s.mu.Lock()
	s.fault = f
	s.mu.Unlock()
}

func openCache(t testing.TB, dir string, max int64) *cache.Cache {
	t.Helper()
	c, err := cache.Open(dir, cache.Options{MaxBytes: max})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// mount mounts a layer FS on a new directory, unmounted when the test
// ends (lazily if it is still busy).
func mount(t testing.TB, ix *layerindex.Index, src layerfs.Source, c *cache.Cache, opts layerfs.Options) (*layerfs.FS, string) {
	t.Helper()
	testenv.RequireFUSE(t)
	f, err := layerfs.New(ix, src, c, opts)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	mountPoints.Store(dir, true)
	srv, err := f.Mount(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unmount(t, srv.Unmount, dir)
		f.Close() // background fetches end before the cache's directory goes
	})
	return f, dir
}

// unmount calls unmount, and on failure reports it and detaches dir.
func unmount(t testing.TB, unmount func() error, dir string) {
	if err := unmount(); err != nil {
		t.Errorf("unmount %s: %v", dir, err)
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("lazy unmount %s: %v", dir, err)
		}
	}
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
