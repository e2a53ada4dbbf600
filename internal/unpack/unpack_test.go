package unpack_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/unpack"
)

// env is the ground a hostile layer plays on: the layer directory inside
// base, and a canary file next to it that no layer may touch.
type env struct {
	base  string // absolute
	rel   string // base without its leading "/"
	layer string
}

func newEnv(t *testing.T) env {
	t.Helper()
	base := t.TempDir()
	for _, d := range []string{"layer", "outside"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"canary", "outside/canary"} {
		if err := os.WriteFile(filepath.Join(base, f), []byte("canary\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return env{base: base, rel: strings.TrimPrefix(base, "/"), layer: filepath.Join(base, "layer")}
}

// guard fails the test if anything outside the layer changed.
func (e env) guard(t *testing.T) {
	t.Helper()
	before := tree(t, e.base, "layer")
	passwd, _ := os.ReadFile("/etc/passwd")
	t.Cleanup(func() {
		if diff := cmp.Diff(before, tree(t, e.base, "layer")); diff != "" {
			t.Errorf("the layer wrote outside its directory (-before +after):\n%s", diff)
		}
		if now, _ := os.ReadFile("/etc/passwd"); !bytes.Equal(now, passwd) {
			t.Errorf("/etc/passwd changed")
		}
	})
}

func (e env) path(p string) string { return filepath.Join(e.layer, p) }

func wantContent(t *testing.T, e env, p, want string) {
	t.Helper()
	b, err := os.ReadFile(e.path(p))
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	if string(b) != want {
		t.Errorf("%s holds %q, want %q", p, b, want)
	}
}

func wantType(t *testing.T, e env, p string, want uint32) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(e.path(p), &st); err != nil {
		t.Fatalf("lstat %s: %v", p, err)
	}
	if st.Mode&unix.S_IFMT != want {
		t.Errorf("%s has type %o, want %o", p, st.Mode&unix.S_IFMT, want)
	}
	return st
}

func wantAbsent(t *testing.T, e env, p string) {
	t.Helper()
	if _, err := os.Lstat(e.path(p)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s exists (%v), want it absent", p, err)
	}
}

func wantWhiteout(t *testing.T, e env, p string) {
	t.Helper()
	if st := wantType(t, e, p, unix.S_IFCHR); st.Rdev != 0 {
		t.Errorf("%s is device %d:%d, want a whiteout (0:0)", p, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
}

func wantXattrs(t *testing.T, e env, p string, want map[string]string) {
	t.Helper()
	if diff := cmp.Diff(want, xattrs(t, e.path(p))); diff != "" {
		t.Errorf("xattrs of %s (-want +got):\n%s", p, diff)
	}
}

func entries(es ...entry) func(testing.TB, env) []byte {
	return func(t testing.TB, _ env) []byte { return tarOf(t, es...) }
}

// sparseBomb is a PAX 1.0 sparse file of 1 TiB holding one byte.
func sparseBomb(t testing.TB) []byte {
	pax := paxRecords("GNU.sparse.major", "1", "GNU.sparse.minor", "0",
		"GNU.sparse.name", "big", "GNU.sparse.realsize", "1099511627776")
	sparseMap := "1\n1099511627775\n1\n"
	body := sparseMap + strings.Repeat("\x00", 512-len(sparseMap)) + "x"
	return tarOf(t,
		entry{raw: rawHeader(t, entry{Header: tar.Header{Name: "PaxHeaders/big", Mode: 0o644}, body: pax}, tar.TypeXHeader)},
		file("GNUSparseFile.0/big", body))
}

func long(c byte, n int) string { return strings.Repeat(string(c), n) }

type hostileCase struct {
	name  string
	root  bool // needs root (devices, trusted.* xattrs)
	blob  func(testing.TB, env) []byte
	opts  unpack.Options
	err   error  // nil for success; ErrInvalid, ErrTooLarge, or errAny
	msg   string // a substring of the error
	check func(*testing.T, env)
}

var errAny = errors.New("any error")

func hostileCases() []hostileCase {
	longPath := long('a', 150) + "/" + long('b', 150) + "/" + long('c', 150)
	return []hostileCase{
		{
			name: "dotdot escape",
			blob: entries(file("../canary", "pwned")),
			err:  unpack.ErrInvalid, msg: `entry "../canary": invalid layer: path escapes the layer`,
		},
		{
			name: "nested dotdot escape",
			blob: entries(dir("a/"), file("a/../../canary", "pwned")),
			err:  unpack.ErrInvalid, msg: `entry "a/../../canary"`,
		},
		{
			name: "absolute dotdot escape",
			blob: entries(file("/../canary", "pwned")),
			err:  unpack.ErrInvalid, msg: `entry "/../canary"`,
		},
		{
			name: "absolute path is confined",
			blob: func(t testing.TB, e env) []byte { return tarOf(t, file(e.base+"/canary", "pwned")) },
			check: func(t *testing.T, e env) {
				wantContent(t, e, e.rel+"/canary", "pwned")
			},
		},
		{
			name: "symlink parent to absolute outside",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, symlink("evil", e.base), file("evil/canary", "pwned"))
			},
			err: errAny, msg: `entry "evil/canary": parent evil: no such file or directory`,
		},
		{
			name: "symlink parent to absolute outside, made to exist",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, dir(e.rel+"/"), symlink("evil", e.base), file("evil/canary", "pwned"))
			},
			check: func(t *testing.T, e env) {
				wantContent(t, e, e.rel+"/canary", "pwned")
			},
		},
		{
			name: "symlink parent climbing out",
			blob: entries(symlink("up", "../../.."), file("up/canary", "pwned")),
			check: func(t *testing.T, e env) {
				wantContent(t, e, "canary", "pwned")
				wantType(t, e, "up", unix.S_IFLNK)
			},
		},
		{
			name: "symlink to / then a path through it",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, symlink("x", "/"), file("x/"+e.rel+"/canary", "pwned"), file("x/etc/passwd", "root::0:0::/:/bin/sh\n"))
			},
			check: func(t *testing.T, e env) {
				wantContent(t, e, e.rel+"/canary", "pwned")
				wantContent(t, e, "etc/passwd", "root::0:0::/:/bin/sh\n")
			},
		},
		{
			name: "hardlink to /etc/passwd",
			blob: entries(hardlink("pw", "/etc/passwd")),
			err:  unpack.ErrInvalid, msg: `entry "pw": invalid layer: hardlink target "/etc/passwd" is not in the layer`,
		},
		{
			name: "hardlink to /etc/passwd resolves in the layer",
			blob: entries(file("etc/passwd", "layer's own"), hardlink("pw", "/etc/passwd")),
			check: func(t *testing.T, e env) {
				wantContent(t, e, "pw", "layer's own")
			},
		},
		{
			name: "hardlink dotdot escape",
			blob: entries(hardlink("h", "../canary")),
			err:  unpack.ErrInvalid, msg: `entry "h": hardlink target "../canary": invalid layer: path escapes the layer`,
		},
		{
			name: "hardlink through a symlinked dir to outside",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, symlink("d", e.base), hardlink("h", "d/canary"))
			},
			err: unpack.ErrInvalid, msg: `entry "h": invalid layer: hardlink target "d/canary" is not in the layer`,
		},
		{
			name: "hardlink through a climbing symlink",
			blob: entries(symlink("d", "../../.."), hardlink("h", "d/canary")),
			err:  unpack.ErrInvalid, msg: `hardlink target "d/canary" is not in the layer`,
		},
		{
			name: "hardlink to an outside symlink links the symlink",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, symlink("s", e.base+"/canary"), hardlink("h", "s"), file("h", "pwned"))
			},
			check: func(t *testing.T, e env) {
				wantType(t, e, "s", unix.S_IFLNK)
				wantContent(t, e, "h", "pwned")
			},
		},
		{
			name: "hardlinked file rewritten",
			blob: entries(file("f", "orig"), hardlink("h", "f"), file("h", "new")),
			check: func(t *testing.T, e env) {
				wantContent(t, e, "f", "orig")
				wantContent(t, e, "h", "new")
			},
		},
		{
			name: "hardlink to a directory",
			blob: entries(dir("d/"), hardlink("h", "d")),
			err:  unpack.ErrInvalid, msg: `entry "h": invalid layer: hardlink target "d" is a directory`,
		},
		{
			name: "whiteout of dotdot",
			blob: entries(dir("a/"), file("a/.wh...", "")),
			err:  unpack.ErrInvalid, msg: `entry "a/.wh...": invalid layer: whiteout of ".."`,
		},
		{
			name: "whiteout of dot",
			blob: entries(file(".wh..", "")),
			err:  unpack.ErrInvalid, msg: `whiteout of "."`,
		},
		{
			name: "whiteout of nothing",
			blob: entries(file("a/.wh.", "")),
			err:  unpack.ErrInvalid, msg: `entry "a/.wh.": invalid layer: whiteout of ""`,
		},
		{
			name: "whiteout through a climbing symlink", root: true,
			blob: entries(symlink("w", "../.."), file("w/.wh.canary", "")),
			check: func(t *testing.T, e env) {
				wantWhiteout(t, e, "canary")
			},
		},
		{
			name: "whiteout", root: true,
			blob: entries(file("b/.wh.gone", "")),
			check: func(t *testing.T, e env) {
				wantWhiteout(t, e, "b/gone")
				wantAbsent(t, e, "b/.wh.gone")
			},
		},
		{
			name: "opaque marker", root: true,
			blob: entries(dir("a/"), file("a/keep", "k"), file("a/.wh..wh..opq", "")),
			check: func(t *testing.T, e env) {
				wantXattrs(t, e, "a", map[string]string{"trusted.overlay.opaque": "y"})
				wantAbsent(t, e, "a/.wh..wh..opq")
				wantContent(t, e, "a/keep", "k")
			},
		},
		{
			name: "whiteout and the same name in one layer", root: true,
			blob: entries(file("c", "mine"), file(".wh.c", ""), file(".wh.d", ""), dir("d/"), file("d/f", "f")),
			check: func(t *testing.T, e env) {
				wantContent(t, e, "c", "mine")
				wantXattrs(t, e, "d", map[string]string{"trusted.overlay.opaque": "y"})
				wantContent(t, e, "d/f", "f")
			},
		},
		{
			name: "aufs metadata skipped",
			blob: entries(dir(".wh..wh.plnk/"), file(".wh..wh.plnk/123.456", "")),
			check: func(t *testing.T, e env) {
				wantAbsent(t, e, ".wh..wh.plnk")
			},
		},
		{
			name: "device nodes", root: true,
			blob: entries(device("dev/null", tar.TypeChar, 1, 3), device("dev/loop0", tar.TypeBlock, 7, 0), device("run/fifo", tar.TypeFifo, 0, 0)),
			check: func(t *testing.T, e env) {
				if st := wantType(t, e, "dev/null", unix.S_IFCHR); st.Rdev != unix.Mkdev(1, 3) {
					t.Errorf("dev/null rdev %x", st.Rdev)
				}
				if st := wantType(t, e, "dev/loop0", unix.S_IFBLK); st.Rdev != unix.Mkdev(7, 0) {
					t.Errorf("dev/loop0 rdev %x", st.Rdev)
				}
				wantType(t, e, "run/fifo", unix.S_IFIFO)
			},
		},
		{
			name: "long names",
			blob: func(t testing.TB, e env) []byte {
				gnu := file(longPath+"/gnu", "gnu")
				gnu.Format = tar.FormatGNU
				gl := hardlink("gnulink", longPath+"/gnu")
				gl.Format = tar.FormatGNU
				return tarOf(t, file(longPath+"/pax", "pax"), gnu, gl, symlink("s", long('t', 300)))
			},
			check: func(t *testing.T, e env) {
				wantContent(t, e, longPath+"/pax", "pax")
				wantContent(t, e, "gnulink", "gnu")
				if l, _ := os.Readlink(e.path("s")); l != long('t', 300) {
					t.Errorf("s -> %q", l)
				}
			},
		},
		{
			name: "name component too long",
			blob: entries(file(long('n', 300), "x")),
			err:  errAny, msg: `entry "` + long('n', 300) + `": lstat: file name too long`,
		},
		{
			name: "file then dir",
			blob: entries(file("x", "f"), dir("x/"), file("x/y", "y")),
			check: func(t *testing.T, e env) {
				wantType(t, e, "x", unix.S_IFDIR)
				wantContent(t, e, "x/y", "y")
			},
		},
		{
			name: "dir then file",
			blob: entries(dir("d/"), file("d/child", "c"), file("d", "file")),
			check: func(t *testing.T, e env) {
				wantContent(t, e, "d", "file")
			},
		},
		{
			name: "file then symlink",
			blob: entries(file("f", "f"), symlink("f", "target")),
			check: func(t *testing.T, e env) {
				if l, _ := os.Readlink(e.path("f")); l != "target" {
					t.Errorf("f -> %q", l)
				}
			},
		},
		{
			name: "dir then dir keeps content",
			blob: func(t testing.TB, e env) []byte {
				d2 := dir("d/")
				d2.Mode, d2.ModTime = 0o700, epoch.Add(time.Hour)
				return tarOf(t, dir("d/"), file("d/c", "c"), d2)
			},
			check: func(t *testing.T, e env) {
				wantContent(t, e, "d/c", "c")
				st := wantType(t, e, "d", unix.S_IFDIR)
				if st.Mode&0o7777 != 0o700 || st.Mtim.Sec != epoch.Add(time.Hour).Unix() {
					t.Errorf("d has mode %o mtime %d, want the second entry's", st.Mode&0o7777, st.Mtim.Sec)
				}
			},
		},
		{
			name: "outside symlink then dir of that name",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, symlink("e", e.base), dir("e/"), file("e/canary", "pwned"))
			},
			check: func(t *testing.T, e env) {
				wantType(t, e, "e", unix.S_IFDIR)
				wantContent(t, e, "e/canary", "pwned")
			},
		},
		{
			name: "outside symlink then file of that name",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, symlink("f", e.base+"/canary"), file("f", "pwned"))
			},
			check: func(t *testing.T, e env) {
				wantType(t, e, "f", unix.S_IFREG)
			},
		},
		{
			name: "dangling symlink parent",
			blob: entries(symlink("dl", "nowhere"), file("dl/x", "x")),
			err:  errAny, msg: `entry "dl/x": parent dl: no such file or directory`,
		},
		{
			name: "overlay xattrs dropped", root: true,
			blob: func(t testing.TB, e env) []byte {
				f := file("f", "x")
				f.PAXRecords = map[string]string{
					"SCHILY.xattr.trusted.overlay.redirect": "/etc",
					"SCHILY.xattr.user.overlay.origin":      "x",
					"SCHILY.xattr.user.ok":                  "1",
				}
				return tarOf(t, f)
			},
			check: func(t *testing.T, e env) {
				wantXattrs(t, e, "f", map[string]string{"user.ok": "1"})
			},
		},
		{
			name: "unsupported entry type",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, entry{raw: rawHeader(t, file("odd", ""), 'Z')})
			},
			err: unpack.ErrInvalid, msg: `entry "odd": invalid layer: unsupported entry type 'Z'`,
		},
		{
			name: "layer root as a file",
			blob: entries(file(".", "x")),
			err:  unpack.ErrInvalid, msg: `entry ".": invalid layer: the layer root can only be a directory`,
		},
		{
			name: "truncated gzip",
			blob: func(t testing.TB, e env) []byte {
				b := gzipOf(t, tarOf(t, file("f", long('x', 100000))))
				return b[:len(b)-10]
			},
			err: unpack.ErrInvalid, msg: "corrupt or truncated gzip stream",
		},
		{
			name: "corrupt gzip",
			blob: func(t testing.TB, e env) []byte {
				b := gzipOf(t, tarOf(t, file("f", "some content"), file("g", "more")))
				b[len(b)-6] ^= 0xff // the CRC
				return b
			},
			err: unpack.ErrInvalid, msg: "invalid layer: corrupt or truncated gzip stream: gzip: invalid checksum",
		},
		{
			name: "zstd",
			blob: func(t testing.TB, e env) []byte { return zstdOf(t, tarOf(t, file("f", "zstd"))) },
			check: func(t *testing.T, e env) {
				wantContent(t, e, "f", "zstd")
			},
		},
		{
			name: "truncated zstd",
			blob: func(t testing.TB, e env) []byte {
				b := zstdOf(t, tarOf(t, file("f", long('z', 100000))))
				return b[:len(b)-8]
			},
			err: unpack.ErrInvalid, msg: "corrupt or truncated zstd stream",
		},
		{
			name: "tar without end marker",
			blob: func(t testing.TB, e env) []byte {
				b := tarOf(t, file("f", "x"))
				return b[:len(b)-1024]
			},
			err: unpack.ErrInvalid, msg: "invalid layer: truncated tar stream (no end-of-archive marker)",
		},
		{
			name: "tar truncated in a file",
			blob: func(t testing.TB, e env) []byte {
				return tarOf(t, file("f", long('x', 2000)))[:1200]
			},
			err: unpack.ErrInvalid, msg: `entry "f": invalid layer: corrupt or truncated tar stream: unexpected EOF`,
		},
		{
			name: "xz",
			blob: func(t testing.TB, e env) []byte { return []byte("\xfd7zXZ\x00rest") },
			err:  unpack.ErrInvalid, msg: "xz compression is not supported",
		},
		{
			name: "empty blob",
			blob: func(t testing.TB, e env) []byte { return nil },
			err:  unpack.ErrInvalid, msg: "truncated tar stream",
		},
		{
			name: "gzip bomb in one file",
			blob: func(t testing.TB, e env) []byte {
				return gzipOf(t, tarOf(t, file("bomb", strings.Repeat("\x00", 64<<20))))
			},
			opts: unpack.Options{MaxBytes: 8 << 20},
			err:  unpack.ErrTooLarge, msg: `entry "bomb": layer exceeds budget: files total more than 8388608 bytes`,
		},
		{
			name: "gzip bomb after the archive",
			blob: func(t testing.TB, e env) []byte {
				return gzipOf(t, append(tarOf(t, file("f", "x")), make([]byte, 64<<20)...))
			},
			opts: unpack.Options{MaxBytes: 1 << 20},
			err:  unpack.ErrTooLarge, msg: "layer exceeds budget: more than 1048576 uncompressed bytes",
		},
		{
			name: "sparse bomb",
			blob: func(t testing.TB, e env) []byte { return sparseBomb(t) },
			err:  unpack.ErrTooLarge, msg: `entry "big": layer exceeds budget: files total more than 68719476736 bytes`,
		},
		{
			name: "entry count bomb",
			blob: func(t testing.TB, e env) []byte {
				var es []entry
				for i := range 20 {
					es = append(es, file(strings.Repeat("f", i+1), ""))
				}
				return gzipOf(t, tarOf(t, es...))
			},
			opts: unpack.Options{MaxEntries: 10},
			err:  unpack.ErrTooLarge, msg: "layer exceeds budget: more than 10 entries",
		},
		{
			name: "directory bomb",
			blob: func(t testing.TB, e env) []byte {
				return gzipOf(t, tarOf(t, file(strings.Repeat("d/", 2000)+"f", "")))
			},
			opts: unpack.Options{MaxEntries: 100},
			err:  unpack.ErrTooLarge, msg: "layer exceeds budget: more than 100 entries and parent directories",
		},
	}
}

// TestHostile unpacks layers built to escape or exhaust the node. Each
// either succeeds with everything confined to the layer directory or fails
// with the expected error, deterministically, and nothing outside the
// layer directory changes.
func TestHostile(t *testing.T) {
	for _, tc := range hostileCases() {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				testenv.RequireRoot(t)
			}
			e := newEnv(t)
			e.guard(t)
			blob := tc.blob(t, e)
			_, err := unpack.Layer(context.Background(), bytes.NewReader(blob), e.layer, tc.opts)
			switch {
			case tc.err == nil && err != nil:
				t.Fatalf("Layer: %v", err)
			case tc.err == nil:
				tc.check(t, e)
				return
			case err == nil:
				t.Fatalf("Layer succeeded, want error %q", tc.msg)
			case tc.err != errAny && !errors.Is(err, tc.err):
				t.Errorf("error %q is not %v", err, tc.err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not contain %q", err, tc.msg)
			}
			// The same layer fails the same way.
			again := t.TempDir()
			_, err2 := unpack.Layer(context.Background(), bytes.NewReader(blob), again, tc.opts)
			if err2 == nil || err2.Error() != err.Error() {
				t.Errorf("second run: %v, first: %v", err2, err)
			}
		})
	}
}

func TestStats(t *testing.T) {
	raw := tarOf(t, dir("a/"), file("a/f", "hello"), file("a/g", "world!"), symlink("l", "a/f"))
	want := digest.FromBytes(raw)
	for _, tc := range []struct {
		name string
		blob []byte
	}{
		{"tar", raw},
		{"gzip", gzipOf(t, raw)},
		{"zstd", zstdOf(t, raw)},
		{"multi-member gzip", append(gzipOf(t, raw[:1024]), gzipOf(t, raw[1024:])...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var last int64
			calls := 0
			st, err := unpack.Layer(context.Background(), bytes.NewReader(tc.blob), t.TempDir(), unpack.Options{
				Progress: func(n int64) {
					if n < last {
						t.Errorf("progress went back from %d to %d", last, n)
					}
					last = n
					calls++
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			wantSt := unpack.Stats{Entries: 4, Bytes: 11, Size: int64(len(raw)), DiffID: want}
			if diff := cmp.Diff(wantSt, st); diff != "" {
				t.Errorf("stats (-want +got):\n%s", diff)
			}
			if calls == 0 || last != int64(len(tc.blob)) {
				t.Errorf("progress ended at %d after %d calls, want %d", last, calls, len(tc.blob))
			}
		})
	}
}

// TestDiffIDCoversPadding checks that bytes after the end-of-archive
// marker (tar's record padding) count in the DiffID, as in docker.
func TestDiffIDCoversPadding(t *testing.T) {
	raw := append(tarOf(t, file("f", "x")), make([]byte, 10240)...)
	st, err := unpack.Layer(context.Background(), bytes.NewReader(gzipOf(t, raw)), t.TempDir(), unpack.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if h := sha256.Sum256(raw); st.DiffID != digest.NewDigestFromBytes(digest.SHA256, h[:]) {
		t.Errorf("DiffID %s does not cover the whole stream", st.DiffID)
	}
}

type failingReader struct {
	r   io.Reader
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		return n, f.err
	}
	return n, err
}

func TestReadErrors(t *testing.T) {
	blob := gzipOf(t, tarOf(t, file("f", long('x', 1<<20))))
	t.Run("download fails", func(t *testing.T) {
		boom := errors.New("connection reset")
		r := &failingReader{r: bytes.NewReader(blob[:len(blob)/2]), err: boom}
		_, err := unpack.Layer(context.Background(), r, t.TempDir(), unpack.Options{})
		if !errors.Is(err, boom) || errors.Is(err, unpack.ErrInvalid) {
			t.Errorf("error %v, want the reader's error and not ErrInvalid", err)
		}
	})
	t.Run("context canceled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		_, err := unpack.Layer(ctx, bytes.NewReader(blob), t.TempDir(), unpack.Options{
			Progress: func(int64) { cancel() },
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("error %v, want context.Canceled", err)
		}
	})
	t.Run("missing directory", func(t *testing.T) {
		_, err := unpack.Layer(context.Background(), bytes.NewReader(blob), filepath.Join(t.TempDir(), "nope"), unpack.Options{})
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("error %v, want not exist", err)
		}
	})
}

// TestMetadata checks modes, owners and nanosecond times on each kind of
// entry, and that directory times survive the entries written into them.
func TestMetadata(t *testing.T) {
	testenv.RequireRoot(t)
	mt := time.Date(2021, 1, 2, 3, 4, 5, 987654321, time.UTC)
	at := mt.Add(time.Minute)
	d := dir("d/")
	d.Mode, d.Uid, d.Gid, d.ModTime = 0o2750, 7, 8, mt
	f := file("d/f", "x")
	f.Mode, f.Uid, f.Gid, f.ModTime, f.AccessTime, f.Format = 0o4711, 1000, 1001, mt, at, tar.FormatPAX
	s := symlink("d/s", "f")
	s.Uid, s.Gid, s.ModTime = 5, 6, mt
	p := device("d/p", tar.TypeFifo, 0, 0)
	p.Mode, p.Uid, p.ModTime = 0o1640, 9, mt
	st := dir("sticky/")
	st.Mode = 0o1777

	for _, h := range []*tar.Header{&d.Header, &f.Header, &s.Header, &p.Header} {
		h.Format = tar.FormatPAX // nanoseconds
	}

	e := newEnv(t)
	if _, err := unpack.Layer(context.Background(), bytes.NewReader(tarOf(t, d, f, s, p, st, file("d/later", "bumps the mtime"))), e.layer, unpack.Options{}); err != nil {
		t.Fatal(err)
	}
	var stat unix.Stat_t
	unix.Stat(e.path("d/f"), &stat) // before reading it changes the atime
	if a := time.Unix(stat.Atim.Sec, stat.Atim.Nsec); !a.Equal(at) {
		t.Errorf("d/f atime %v, want %v", a, at)
	}
	got := tree(t, e.layer)
	check := func(p string, mode, uid, gid uint32) {
		t.Helper()
		n := got[p]
		if n.Mode != mode || n.UID != uid || n.GID != gid || !n.Mtime.Equal(mt) {
			t.Errorf("%s: mode %o owner %d:%d mtime %v, want %o %d:%d %v", p, n.Mode, n.UID, n.GID, n.Mtime, mode, uid, gid, mt)
		}
	}
	check("d", 0o2750, 7, 8)
	check("d/f", 0o4711, 1000, 1001)
	check("d/s", 0, 5, 6)
	check("d/p", 0o1640, 9, 0)
	if got["sticky"].Mode != 0o1777 {
		t.Errorf("sticky has mode %o", got["sticky"].Mode)
	}
}
