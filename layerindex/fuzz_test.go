package layerindex_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"math/rand/v2"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/layerindex"
)

// seedTars are small real layers for the fuzzers' seed corpora.
func seedTars(t testing.TB) [][]byte {
	long := strings.Repeat("long/", 30) + "name"
	sparse, _ := oldGNUSparse(t, "sparse", 64<<10, []chunk{{1000, 100}, {60000, 200}})
	tars := [][]byte{
		tarOf(t, 0, dir("a/"), reg("a/f", "hello"), symlink("a/s", "f"), hardlink("a/h", "a/f")),
		tarOf(t, tar.FormatPAX, withXattrs(reg(long, "x"), "user.a", "1", "trusted.overlay.opaque", "y"), reg("b/.wh.c", ""), reg("d/.wh..wh..opq", "")),
		tarOf(t, tar.FormatGNU, reg(long, "gnu"), hardlink("l", long), dir("e/"), reg(".wh.e", ""),
			ent{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3}},
			ent{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "fifo", Mode: 0o600}}),
		tarOf(t, 0, reg("dup", "1"), hardlink("dup2", "dup"), reg("dup", "2"), dir("x/"), reg("x/y", ""), reg("x", "file")),
		sparse,
	}
	return tars
}

// fuzzing reports whether this test binary is fuzzing (-test.fuzz).
func fuzzing() bool {
	fl := flag.Lookup("test.fuzz")
	return fl != nil && fl.Value.String() != ""
}

// bigSeed spans two frames; the fuzzers get it compressed only, as a
// plain tar it would make every mutation slow.
func bigSeed(t testing.TB) []byte {
	return tarOf(t, 0, regBytes("big", bytes.Repeat([]byte("0123456789"), 160000), 0o755), reg("small", "s"))
}

var fuzzOpts = layerindex.Options{
	MaxUncompressedBytes: 8 << 20,
	MaxEntries:           2000,
	MaxPathDepth:         40,
	MaxPathLength:        1024,
	MaxXattrSize:         1024,
	MaxZstdWindow:        8 << 20,
}

// The fuzzers run over their seed corpora in every "go test". To fuzz:
//
//	go test -run '^$' -fuzz '^FuzzBuild$' -fuzztime 60s -fuzzminimizetime 5s ./layerindex/
//
// (tar inputs are kilobytes; Go's minimiser is quadratic in the input size
// and, left at its default of 60s, stalls the workers.)
func FuzzBuild(f *testing.F) {
	for _, tb := range seedTars(f) {
		f.Add(tb)
		f.Add(gz(f, tb))
		f.Add(zst(f, tb))
	}
	if !fuzzing() {
		// Two frames: the oracles run on a multi-frame layer in every
		// "go test", but the fuzzer does not mutate it (each run takes
		// milliseconds, which stalls minimisation).
		f.Add(gz(f, bigSeed(f)))
		f.Add(zst(f, bigSeed(f)))
	}
	f.Add([]byte{})
	f.Add([]byte("\x1f\x8b"))
	f.Add([]byte("\x28\xb5\x2f\xfd"))
	f.Fuzz(func(t *testing.T, layer []byte) {
		opts := fuzzOpts
		x, data, err := build(t, layer, opts)
		if err != nil {
			if !errors.Is(err, layerindex.ErrInvalidLayer) {
				t.Fatalf("error %v does not match ErrInvalidLayer", err)
			}
			return
		}
		checkBuilt(t, x, data, layer, opts)
	})
}

// checkBuilt holds the oracles for a successfully built layer.
func checkBuilt(t *testing.T, x *layerindex.Index, data, layer []byte, opts layerindex.Options) {
	t.Helper()
	if x.Layer != sha(layer) {
		t.Fatalf("layer digest %s, want %s", x.Layer, sha(layer))
	}
	if x.Data != sha(data) || x.DataSize != int64(len(data)) {
		t.Fatalf("data digest/size do not match the data blob")
	}
	if len(x.Entries) > opts.MaxEntries+1 {
		t.Fatalf("%d entries over the budget of %d", len(x.Entries), opts.MaxEntries)
	}
	if x.StreamSize > opts.MaxUncompressedBytes {
		t.Fatalf("data stream of %d bytes over the budget", x.StreamSize)
	}
	for i, e := range x.Entries {
		p := e.Path
		if i == 0 {
			if p != "" || e.Type != layerindex.TypeDir {
				t.Fatalf("first entry %+v is not the root", e)
			}
			continue
		}
		if path.Clean(p) != p || !filepath.IsLocal(p) || strings.HasPrefix(p, "/") {
			t.Fatalf("path %q is not clean and local", p)
		}
		for c := range strings.SplitSeq(p, "/") {
			if c == ".." || c == "." || c == "" {
				t.Fatalf("path %q has component %q", p, c)
			}
		}
		if len(p) > opts.MaxPathLength || strings.Count(p, "/")+1 > opts.MaxPathDepth {
			t.Fatalf("path %q over budget", p)
		}
		for _, xa := range e.Xattrs {
			if strings.HasPrefix(xa.Name, "trusted.overlay.") || strings.HasPrefix(xa.Name, "user.overlay.") {
				t.Fatalf("%q kept overlay xattr %q", p, xa.Name)
			}
			if len(xa.Value) > opts.MaxXattrSize {
				t.Fatalf("%q: xattr over budget", p)
			}
		}
		if parent := x.Parent(i); parent < 0 || x.Entries[parent].Type != layerindex.TypeDir {
			t.Fatalf("%q: parent %d is not a directory", p, parent)
		}
	}
	enc, err := x.MarshalBinary()
	if err != nil {
		t.Fatalf("MarshalBinary: %v", err)
	}
	y, err := layerindex.Decode(enc)
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if diff := cmp.Diff(x, y, indexCmp...); diff != "" {
		t.Fatalf("round trip differs:\n%s", diff)
	}
	for _, e := range x.Entries {
		if e.Type != layerindex.TypeReg && e.Type != layerindex.TypeHardlink {
			continue
		}
		// ReadFile verifies every frame and the file's sha256.
		got, err := x.ReadFile(bytes.NewReader(data), e.Path)
		if err != nil {
			t.Fatalf("ReadFile: %v", err)
		}
		if e.Type == layerindex.TypeReg && int64(len(got)) != e.Size {
			t.Fatalf("%q: %d bytes, want %d", e.Path, len(got), e.Size)
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, tb := range seedTars(f) {
		x, _ := mustBuild(f, tb)
		enc, err := x.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(enc)
	}
	for seed := range uint64(4) {
		r := rand.New(rand.NewPCG(seed, 1))
		enc, err := genIndex(r, 20).MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(enc)
	}
	f.Add([]byte("STRATAIX"))
	f.Add([]byte("STRATAIX\x01\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		x, err := layerindex.Decode(b)
		if err != nil {
			if !errors.Is(err, layerindex.ErrInvalidIndex) {
				t.Fatalf("error %v does not match ErrInvalidIndex", err)
			}
			return
		}
		enc, err := x.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded index does not encode: %v", err)
		}
		if !bytes.Equal(enc, b) {
			t.Fatalf("re-encoding differs from the input")
		}
		y, err := layerindex.Decode(enc)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(x, y, indexCmp...); diff != "" {
			t.Fatalf("second decode differs:\n%s", diff)
		}
		for i, e := range x.Entries {
			if j, ok := x.Lookup(e.Path); !ok || j != i {
				t.Fatalf("Lookup(%q) = %d, %v; want %d", e.Path, j, ok, i)
			}
			for _, c := range x.Children(i) {
				if x.Parent(int(c)) != i {
					t.Fatalf("child %d of %d has parent %d", c, i, x.Parent(int(c)))
				}
			}
			if e.Type == layerindex.TypeReg && e.Size > 0 {
				first, last := x.FramesFor(e.Offset, e.Size)
				if first > last || x.Frames[first].UOffset > e.Offset || x.Frames[last].UOffset+x.Frames[last].USize < e.Offset+e.Size {
					t.Fatalf("FramesFor(%d, %d) = %d, %d", e.Offset, e.Size, first, last)
				}
			}
		}
	})
}
