package layerindex_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/strata-oci/strata/layerindex"
)

// putNumeric writes a tar numeric field: octal when it fits, else base-256.
func putNumeric(b []byte, v int64) {
	if v < 1<<(3*(len(b)-1)) {
		copy(b, fmt.Sprintf("%0*o\x00", len(b)-1, v))
		return
	}
	for i := range b {
		b[i] = 0
	}
	for i := len(b) - 1; i > 0 && v > 0; i-- {
		b[i] = byte(v)
		v >>= 8
	}
	b[0] |= 0x80
}

func fixChecksum(blk []byte) {
	for i := 148; i < 156; i++ {
		blk[i] = ' '
	}
	var sum int64
	for _, c := range blk[:512] {
		sum += int64(c)
	}
	copy(blk[148:], fmt.Sprintf("%06o\x00 ", sum))
}

type chunk struct{ off, n int64 }

// oldGNUSparse builds a tar with one old-GNU sparse file ('S') of logical
// size realSize whose data chunks hold the byte 'A'+i.
func oldGNUSparse(t testing.TB, name string, realSize int64, chunks []chunk) (layer, want []byte) {
	t.Helper()
	var packed []byte
	for i, c := range chunks {
		packed = append(packed, bytes.Repeat([]byte{byte('A' + i)}, int(c.n))...)
	}
	tb := tarOf(t, tar.FormatGNU, ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: epoch}, body: packed})
	blk := tb[:512]
	blk[156] = tar.TypeGNUSparse
	for i, c := range chunks {
		putNumeric(blk[386+24*i:][:12], c.off)
		putNumeric(blk[386+24*i+12:][:12], c.n)
	}
	putNumeric(blk[483:][:12], realSize)
	fixChecksum(blk)
	if realSize < 64<<20 {
		want = make([]byte, realSize)
		for i, c := range chunks {
			copy(want[c.off:], bytes.Repeat([]byte{byte('A' + i)}, int(c.n)))
		}
	}
	return tb, want
}

func TestBuildHostile(t *testing.T) {
	sparse, sparseWant := oldGNUSparse(t, "sparse", 2<<20, []chunk{{4096, 512}, {2<<20 - 512, 512}})
	sparseBomb, _ := oldGNUSparse(t, "bomb", 1<<40, []chunk{{1<<40 - 512, 512}})
	longName := strings.Repeat("d/", 80) + strings.Repeat("x", 200)
	longTarget := strings.Repeat("t", 150)
	big := bytes.Repeat([]byte{0}, 4<<20)
	simple := tarOf(t, 0, dir("a/"), reg("a/f", "hello"), symlink("a/s", "f"))
	corruptTar := append([]byte(nil), simple...)
	corruptTar[100] ^= 0xff // mode field; the header checksum no longer matches
	corruptZstd := zst(t, tarOf(t, 0, reg("f", strings.Repeat("some text ", 1000))))
	corruptZstd[len(corruptZstd)/2] ^= 0x55
	corruptGzip := gz(t, tarOf(t, 0, reg("f", strings.Repeat("some text ", 1000))))
	corruptGzip[len(corruptGzip)/2] ^= 0x55
	deviceTar := tarOf(t, 0,
		ent{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: epoch}},
		ent{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/sda", Mode: 0o660, Devmajor: 8, Devminor: 0, Gid: 6, ModTime: epoch}},
		ent{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "run/fifo", Mode: 0o600, ModTime: epoch}},
	)
	unsupported := tarOf(t, 0, reg("f", "x"))
	unsupported[156] = 'V'
	fixChecksum(unsupported)
	uidRange := tarOf(t, tar.FormatPAX, ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "f", Uid: 1 << 33, ModTime: epoch}})
	padded := append(tarOf(t, 0, reg("f", "x")), make([]byte, 8<<20)...)
	estargz := append(gz(t, tarOf(t, 0, reg("a", "first member"))[:1024]), gz(t, tarOf(t, 0, reg("b", "second member")))...)
	wideZstd := zst(t, tarOf(t, 0, regBytes("f", bytes.Repeat([]byte("0123456789abcdef"), 1<<17), 0o644)),
		zstd.WithWindowSize(8<<20), zstd.WithSingleSegment(false))
	withGlobal := func() []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "pax_global_header", PAXRecords: map[string]string{"comment": "git"}})
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "f", Size: 1, Mode: 0o644})
		tw.Write([]byte("x"))
		tw.Close()
		return buf.Bytes()
	}()

	type check func(t *testing.T, x *layerindex.Index, data []byte)
	tests := []struct {
		name   string
		layer  []byte
		opts   layerindex.Options
		refuse string // substring of the error; "" means accepted
		budget bool   // the refusal is a budget
		check  check
	}{
		{name: "dotdot", layer: tarOf(t, 0, reg("../evil", "x")), refuse: `".."`},
		{name: "dotdot nested", layer: tarOf(t, 0, dir("a/"), reg("a/../../evil", "x")), refuse: `".."`},
		{name: "dotdot inside", layer: tarOf(t, 0, reg("a/b/../c", "x")), refuse: `".."`},
		{name: "absolute path is made relative", layer: tarOf(t, 0, reg("/etc/passwd", "root")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "etc/passwd", []byte("root"))
				if e := entry(t, x, "etc"); e.Type != layerindex.TypeDir || e.Mode != layerindex.ImpliedDirMode {
					t.Errorf("implied etc: %+v", e)
				}
			}},
		{name: "absolute dotdot", layer: tarOf(t, 0, reg("/../etc/passwd", "x")), refuse: `".."`},
		{name: "symlinked parent", layer: tarOf(t, 0, symlink("lnk", "/etc"), reg("lnk/passwd", "x")), refuse: "symlink"},
		{name: "symlink replaces dir then child", layer: tarOf(t, 0, dir("d/"), symlink("d", "/etc"), reg("d/x", "x")), refuse: "symlink"},
		{name: "parent is a file", layer: tarOf(t, 0, reg("f", "x"), reg("f/x", "y")), refuse: "not a directory"},
		{name: "hardlink to missing", layer: tarOf(t, 0, hardlink("l", "missing")), refuse: "not in the layer"},
		{name: "hardlink to later entry", layer: tarOf(t, 0, hardlink("l", "f"), reg("f", "x")), refuse: "not in the layer"},
		{name: "hardlink outside", layer: tarOf(t, 0, reg("f", "x"), hardlink("l", "../../etc/shadow")), refuse: `".."`},
		{name: "hardlink to symlink", layer: tarOf(t, 0, symlink("s", "/etc/passwd"), hardlink("l", "s")), refuse: "not a regular file"},
		{name: "hardlink to dir", layer: tarOf(t, 0, dir("d/"), hardlink("l", "d")), refuse: "not a regular file"},
		{name: "hardlink through symlink", layer: tarOf(t, 0, dir("d/"), reg("d/f", "x"), symlink("s", "d"), hardlink("l", "s/f")), refuse: "not in the layer"},
		{name: "hardlink to itself", layer: tarOf(t, 0, reg("f", "x"), hardlink("f", "f")), refuse: "itself"},
		{name: "hardlink absolute target", layer: tarOf(t, 0, reg("f", "content"), hardlink("l", "/f")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if e := entry(t, x, "l"); e.Type != layerindex.TypeHardlink || e.Linkname != "f" {
					t.Errorf("l: %+v", e)
				}
				checkContent(t, x, data, "l", []byte("content"))
				if i, _ := x.Lookup("f"); x.Nlink(i) != 2 {
					t.Errorf("nlink of f = %d, want 2", x.Nlink(i))
				}
			}},
		{name: "whiteout of dot", layer: tarOf(t, 0, reg(".wh..", "")), refuse: "whiteout"},
		{name: "whiteout of dotdot", layer: tarOf(t, 0, reg("a/.wh...", "")), refuse: "whiteout"},
		{name: "whiteout of nothing", layer: tarOf(t, 0, reg("a/.wh.", "")), refuse: "whiteout"},
		{name: "path through whiteout", layer: tarOf(t, 0, reg("a/.wh.b/c", "")), refuse: "whiteout"},
		{name: "whiteout", layer: tarOf(t, 0, dir("a/"), reg("a/.wh.gone", "")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				e := entry(t, x, "a/gone")
				if e.Type != layerindex.TypeWhiteout || e.Mode != 0 || e.ModTime != 0 {
					t.Errorf("a/gone: %+v", e)
				}
				if _, ok := x.Lookup("a/.wh.gone"); ok {
					t.Error("the whiteout file itself is listed")
				}
			}},
		{name: "opaque", layer: tarOf(t, 0, reg("a/.wh..wh..opq", ""), reg("a/kept", "x")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if e := entry(t, x, "a"); e.Type != layerindex.TypeDir || !e.Opaque {
					t.Errorf("a: %+v", e)
				}
				if len(x.Entries) != 3 {
					t.Errorf("entries: %v", paths(x))
				}
			}},
		{name: "whiteout and directory in one layer make it opaque", layer: tarOf(t, 0, reg(".wh.d", ""), dir("d/"), reg("d/new", "x")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if e := entry(t, x, "d"); e.Type != layerindex.TypeDir || !e.Opaque {
					t.Errorf("d: %+v", e)
				}
				checkContent(t, x, data, "d/new", []byte("x"))
			}},
		{name: "aufs metadata ignored", layer: tarOf(t, 0, dir(".wh..wh.plnk/"), reg(".wh..wh.plnk/1.2", "x"), reg(".wh..wh.aufs", ""), reg("f", "y")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if len(x.Entries) != 2 {
					t.Errorf("entries: %v", paths(x))
				}
			}},
		{name: "duplicate file last wins", layer: tarOf(t, 0, reg("f", "first"), regBytes("f", []byte("second"), 0o600)),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "f", []byte("second"))
				if e := entry(t, x, "f"); e.Mode != 0o600 {
					t.Errorf("mode %o", e.Mode)
				}
			}},
		{name: "file replaces directory with its subtree", layer: tarOf(t, 0, dir("d/"), reg("d/x", "x"), reg("d", "now a file")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "d", []byte("now a file"))
				if _, ok := x.Lookup("d/x"); ok {
					t.Error("d/x survived")
				}
			}},
		{name: "directory over directory keeps children", layer: tarOf(t, 0, dir("d/"), reg("d/x", "x"), ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "d", Mode: 0o700, ModTime: epoch}}),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "d/x", []byte("x"))
				if e := entry(t, x, "d"); e.Mode != 0o700 {
					t.Errorf("mode %o", e.Mode)
				}
			}},
		{name: "hardlink keeps replaced content", layer: tarOf(t, 0, reg("a", "v1"), hardlink("b", "a"), reg("a", "v2")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "a", []byte("v2"))
				checkContent(t, x, data, "b", []byte("v1"))
				if e := entry(t, x, "b"); e.Type != layerindex.TypeReg {
					t.Errorf("b: %+v", e)
				}
			}},
		{name: "overlay xattrs stripped", layer: tarOf(t, tar.FormatPAX, withXattrs(reg("f", "x"), "trusted.overlay.opaque", "y", "user.overlay.redirect", "/x", "user.keep", "v", "security.capability", "\x01\x00")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				want := []layerindex.Xattr{{Name: "security.capability", Value: "\x01\x00"}, {Name: "user.keep", Value: "v"}}
				if got := entry(t, x, "f").Xattrs; fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("xattrs %q, want %q", got, want)
				}
			}},
		{name: "PAX long names", layer: tarOf(t, tar.FormatPAX, reg(longName, "long"), symlink("s", longTarget)),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, longName, []byte("long"))
				if e := entry(t, x, "s"); e.Linkname != longTarget {
					t.Errorf("target %q", e.Linkname)
				}
			}},
		{name: "GNU long names", layer: tarOf(t, tar.FormatGNU, reg(longName, "long"), hardlink("l", longName), symlink("s", longTarget)),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "l", []byte("long"))
				if e := entry(t, x, "s"); e.Linkname != longTarget {
					t.Errorf("target %q", e.Linkname)
				}
			}},
		{name: "GNU sparse file is expanded", layer: sparse,
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "sparse", sparseWant)
			}},
		{name: "sparse bomb", layer: sparseBomb, refuse: "budget", budget: true},
		{name: "truncated gzip", layer: gz(t, simple)[:60], refuse: "truncated gzip"},
		{name: "corrupt gzip", layer: corruptGzip, refuse: "corrupt gzip"},
		{name: "gzip with trailing garbage", layer: append(gz(t, simple), "garbage"...), refuse: "gzip"},
		{name: "corrupt zstd", layer: corruptZstd, refuse: "zstd"},
		{name: "truncated zstd", layer: zst(t, simple)[:40], refuse: "truncated zstd"},
		{name: "truncated tar in content", layer: simple[:1024+3], refuse: "truncated tar"},
		{name: "truncated tar in padding", layer: simple[:1024+100], refuse: "truncated tar"},
		{name: "tar without end marker", layer: simple[:2048],
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "a/f", []byte("hello"))
			}},
		{name: "corrupt tar header", layer: corruptTar, refuse: "corrupt tar"},
		{name: "garbage", layer: []byte(strings.Repeat("not a tar at all ", 64)), refuse: "tar"},
		{name: "xz", layer: []byte("\xfd7zXZ\x00 rest"), refuse: "xz"},
		{name: "bytes budget", layer: gz(t, tarOf(t, 0, regBytes("zeros", big, 0o644))), opts: layerindex.Options{MaxUncompressedBytes: 1 << 20}, refuse: "budget", budget: true},
		{name: "bytes budget padding", layer: gz(t, padded), opts: layerindex.Options{MaxUncompressedBytes: 1 << 20}, refuse: "tar stream exceeds the budget", budget: true},
		{name: "entries budget", layer: tarOf(t, 0, reg("a", ""), reg("b", ""), reg("c", ""), reg("d", "")), opts: layerindex.Options{MaxEntries: 3}, refuse: "entries", budget: true},
		{name: "implied dirs count as entries", layer: tarOf(t, 0, reg("a/b/c/d", "")), opts: layerindex.Options{MaxEntries: 3}, refuse: "entries", budget: true},
		{name: "depth budget", layer: tarOf(t, 0, reg("a/b/c/d/e", "")), opts: layerindex.Options{MaxPathDepth: 4}, refuse: "deeper", budget: true},
		{name: "path length budget", layer: tarOf(t, tar.FormatPAX, reg(strings.Repeat("x", 60), "")), opts: layerindex.Options{MaxPathLength: 50}, refuse: "longer than the budget", budget: true},
		{name: "name too long", layer: tarOf(t, tar.FormatPAX, reg(strings.Repeat("x", 256), "")), refuse: "longer than 255"},
		{name: "xattr budget", layer: tarOf(t, tar.FormatPAX, withXattrs(reg("f", ""), "user.big", strings.Repeat("v", 100))), opts: layerindex.Options{MaxXattrSize: 16}, refuse: "xattr", budget: true},
		{name: "metadata budget: xattrs", layer: tarOf(t, tar.FormatPAX, withXattrs(reg("f", ""), "user.a", strings.Repeat("v", 60)), withXattrs(reg("g", ""), "user.a", strings.Repeat("v", 60))), opts: layerindex.Options{MaxMetadataBytes: 100}, refuse: "metadata budget", budget: true},
		{name: "metadata budget: names", layer: tarOf(t, tar.FormatPAX, reg(strings.Repeat("x", 60), ""), reg(strings.Repeat("y", 60), "")), opts: layerindex.Options{MaxMetadataBytes: 100}, refuse: "metadata budget", budget: true},
		{name: "zstd window budget", layer: wideZstd, opts: layerindex.Options{MaxZstdWindow: 1 << 20}, refuse: "window", budget: true},
		{name: "devices and fifo kept as metadata", layer: deviceTar,
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if e := entry(t, x, "dev/null"); e.Type != layerindex.TypeChar || e.Devmajor != 1 || e.Devminor != 3 || e.Mode != 0o666 {
					t.Errorf("dev/null: %+v", e)
				}
				if e := entry(t, x, "dev/sda"); e.Type != layerindex.TypeBlock || e.Devmajor != 8 || e.GID != 6 {
					t.Errorf("dev/sda: %+v", e)
				}
				if e := entry(t, x, "run/fifo"); e.Type != layerindex.TypeFIFO || e.Mode != 0o600 {
					t.Errorf("run/fifo: %+v", e)
				}
				if x.StreamSize != 0 || len(x.Frames) != 0 {
					t.Errorf("devices wrote data: %d bytes", x.StreamSize)
				}
			}},
		{name: "setuid kept", layer: tarOf(t, 0, regBytes("bin/su", []byte("elf"), 0o4755), ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "tmp", Mode: 0o1777, ModTime: epoch}}),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if e := entry(t, x, "bin/su"); e.Mode != 0o4755 {
					t.Errorf("mode %o", e.Mode)
				}
				if e := entry(t, x, "tmp"); e.Mode != 0o1777 {
					t.Errorf("mode %o", e.Mode)
				}
			}},
		{name: "root entry sets root attributes", layer: tarOf(t, 0, ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o700, Uid: 5, ModTime: epoch}}, reg("./f", "x")),
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if e := entry(t, x, ""); e.Mode != 0o700 || e.UID != 5 || e.ModTime != epoch.Unix() {
					t.Errorf("root: %+v", e)
				}
			}},
		{name: "root as a file", layer: tarOf(t, 0, reg(".", "x")), refuse: "root"},
		{name: "unsupported type", layer: unsupported, refuse: "unsupported"},
		{name: "uid out of range", layer: uidRange, refuse: "out of range"},
		{name: "empty symlink target", layer: tarOf(t, 0, symlink("s", "")), refuse: "empty target"},
		{name: "global header ignored", layer: withGlobal,
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if len(x.Entries) != 2 {
					t.Errorf("entries: %v", paths(x))
				}
			}},
		{name: "estargz-like gzip members", layer: estargz,
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				checkContent(t, x, data, "a", []byte("first member"))
				checkContent(t, x, data, "b", []byte("second member"))
			}},
		{name: "empty blob is an empty layer", layer: nil,
			check: func(t *testing.T, x *layerindex.Index, data []byte) {
				if len(x.Entries) != 1 || len(data) != 0 {
					t.Errorf("entries %v, %d data bytes", paths(x), len(data))
				}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x, data, err := build(t, tc.layer, tc.opts)
			if tc.refuse != "" {
				if err == nil {
					t.Fatalf("accepted, want refusal mentioning %q; entries %v", tc.refuse, paths(x))
				}
				if !errors.Is(err, layerindex.ErrInvalidLayer) {
					t.Fatalf("error %v does not match ErrInvalidLayer", err)
				}
				if !strings.Contains(err.Error(), tc.refuse) {
					t.Fatalf("error %q does not mention %q", err, tc.refuse)
				}
				t.Logf("refused: %v", err)
				if got := errors.Is(err, layerindex.ErrBudget); got != tc.budget {
					t.Fatalf("errors.Is(ErrBudget) = %v for %v", got, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if tc.check != nil {
				tc.check(t, x, data)
			}
		})
	}
}

// A failing reader or writer is not the layer's fault.
func TestBuildIOErrors(t *testing.T) {
	layer := gz(t, tarOf(t, 0, regBytes("f", bytes.Repeat([]byte("x"), 3<<20), 0o644)))
	boom := errors.New("boom")
	_, err := layerindex.Build(t.Context(), &failingReader{data: layer, after: 1000, err: boom}, &bytes.Buffer{}, layerindex.Options{})
	if !errors.Is(err, boom) || errors.Is(err, layerindex.ErrInvalidLayer) {
		t.Errorf("reader failure: %v", err)
	}
	_, err = layerindex.Build(t.Context(), bytes.NewReader(layer), failingWriter{boom}, layerindex.Options{})
	if !errors.Is(err, boom) || errors.Is(err, layerindex.ErrInvalidLayer) {
		t.Errorf("writer failure: %v", err)
	}
}

func TestBuildCanceled(t *testing.T) {
	layer := tarOf(t, 0, regBytes("f", bytes.Repeat([]byte("x"), 3<<20), 0o644))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := layerindex.Build(ctx, bytes.NewReader(layer), &bytes.Buffer{}, layerindex.Options{})
	if !errors.Is(err, context.Canceled) || errors.Is(err, layerindex.ErrInvalidLayer) {
		t.Errorf("got %v", err)
	}
}

type failingReader struct {
	data  []byte
	after int
	err   error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.after <= 0 {
		return 0, r.err
	}
	n := copy(p[:min(len(p), r.after)], r.data)
	r.data, r.after = r.data[n:], r.after-n
	return n, nil
}

type failingWriter struct{ err error }

func (w failingWriter) Write([]byte) (int, error) { return 0, w.err }

// TestXattrBomb: half a megabyte of gzip holding 600 files with 15 xattrs
// of 64 KiB each. Before the metadata budget, Build kept all of it (a
// 589 MB index, 6.4 GB of heap at its peak); now the default budget stops
// it at the 68th file, with a few tens of MB of heap.
func TestXattrBomb(t *testing.T) {
	var buf bytes.Buffer
	gw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gw)
	val := strings.Repeat("x", 64<<10-100)
	for i := range 600 {
		pax := map[string]string{}
		for j := range 15 {
			pax[fmt.Sprintf("SCHILY.xattr.user.a%02d", j)] = val
		}
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("f%05d", i), Mode: 0o644, Typeflag: tar.TypeReg, PAXRecords: pax, Format: tar.FormatPAX}); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	gw.Close()
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := layerindex.Build(context.Background(), bytes.NewReader(buf.Bytes()), io.Discard, layerindex.Options{})
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("%d bytes of gzip; %d MB allocated by Build", buf.Len(), (after.TotalAlloc-before.TotalAlloc)>>20)
	if !errors.Is(err, layerindex.ErrBudget) || !strings.Contains(err.Error(), "metadata budget") {
		t.Fatalf("Build = %v, want the metadata budget refusal", err)
	}
	var le *layerindex.LayerError
	if !errors.As(err, &le) || le.Name >= "f00100" {
		t.Fatalf("refused at %q, want within the first 100 files", le.Name)
	}
}
