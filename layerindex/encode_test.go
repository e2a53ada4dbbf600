package layerindex_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/layerindex"
)

var indexCmp = []cmp.Option{cmpopts.IgnoreUnexported(layerindex.Index{})}

func randDigest(r *rand.Rand) digest.Digest {
	var b [32]byte
	for i := range b {
		b[i] = byte(r.UintN(256))
	}
	return digest.NewDigestFromBytes(digest.SHA256, b[:])
}

// genIndex generates a valid index with about n entries.
func genIndex(r *rand.Rand, n int) *layerindex.Index {
	names := []string{"a", "a.b", "a-b", "a0", "b", "bin", "lib", "x y", "\xff\xfe", "é", "..a", ".hidden", "Z", "~"}
	name := func() string {
		if r.IntN(3) == 0 {
			return names[r.IntN(len(names))]
		}
		var b strings.Builder
		for range 1 + r.IntN(12) {
			b.WriteByte(byte(0x21 + r.IntN(0x7e-0x21)))
		}
		s := strings.ReplaceAll(b.String(), "/", "_")
		if s == "." || s == ".." {
			s = "dot"
		}
		return s
	}
	x := &layerindex.Index{
		Version:   layerindex.Version,
		Layer:     randDigest(r),
		DiffID:    randDigest(r),
		MediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
	}
	for range r.IntN(5) {
		u := int64(1 + r.IntN(layerindex.FrameSize))
		c := int64(1 + r.IntN(int(u)))
		x.Frames = append(x.Frames, layerindex.Frame{COffset: x.DataSize, CSize: c, UOffset: x.StreamSize, USize: u, Digest: randDigest(r)})
		x.DataSize += c
		x.StreamSize += u
	}
	x.Data = randDigest(r)
	if len(x.Frames) == 0 {
		x.Data = sha(nil)
	}
	// A tree of paths: pick a random existing directory, add a child.
	seen := map[string]bool{"": true}
	dirs := []string{""}
	var list []string
	for len(list) < n {
		parent := dirs[r.IntN(len(dirs))]
		p := name()
		if parent != "" {
			p = parent + "/" + p
		}
		if seen[p] {
			continue
		}
		seen[p] = true
		list = append(list, p)
		if r.IntN(3) == 0 {
			dirs = append(dirs, p)
		}
	}
	isDir := map[string]bool{}
	for _, d := range dirs {
		isDir[d] = true
	}
	list = append(list, "")
	slices.SortFunc(list, layerindex.ComparePaths)
	var regs []string
	for _, p := range list {
		e := layerindex.Entry{Path: p, Mode: uint32(r.IntN(0o10000)), UID: r.Uint32(), GID: uint32(r.IntN(3)),
			ModTime: r.Int64N(1<<40) - 1<<39, ModNsec: uint32(r.IntN(1e9))}
		if r.IntN(4) == 0 {
			e.Xattrs = []layerindex.Xattr{{Name: "security.capability", Value: "\x00\x01"}, {Name: "user.k" + name(), Value: name()}}
		}
		t := layerindex.Type(1 + r.IntN(8))
		if isDir[p] {
			t = layerindex.TypeDir
		}
		if t == layerindex.TypeHardlink && len(regs) == 0 {
			t = layerindex.TypeReg
		}
		e.Type = t
		switch t {
		case layerindex.TypeReg:
			if x.StreamSize > 0 && r.IntN(5) > 0 {
				e.Offset = r.Int64N(x.StreamSize)
				e.Size = r.Int64N(x.StreamSize - e.Offset + 1)
			}
			if e.Size == 0 {
				e.Offset = 0
				e.Digest = sha(nil)
			} else {
				e.Digest = randDigest(r)
			}
			regs = append(regs, p)
		case layerindex.TypeDir:
			e.Opaque = r.IntN(3) == 0
		case layerindex.TypeSymlink:
			e.Linkname = "../" + name()
		case layerindex.TypeChar, layerindex.TypeBlock:
			e.Devmajor, e.Devminor = r.Uint32(), uint32(r.IntN(256))
		case layerindex.TypeHardlink, layerindex.TypeWhiteout:
			e = layerindex.Entry{Path: p, Type: t}
			if t == layerindex.TypeHardlink {
				e.Linkname = regs[r.IntN(len(regs))]
			}
		}
		x.Entries = append(x.Entries, e)
	}
	return x
}

func TestRoundTrip(t *testing.T) {
	for seed := range uint64(60) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 7))
			x := genIndex(r, r.IntN(300))
			enc, err := x.MarshalBinary()
			if err != nil {
				t.Fatalf("MarshalBinary: %v", err)
			}
			y, err := layerindex.Decode(enc)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if diff := cmp.Diff(x, y, indexCmp...); diff != "" {
				t.Fatalf("Decode(Encode(x)) differs (-x +y):\n%s", diff)
			}
			var buf bytes.Buffer
			if err := y.Encode(&buf); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf.Bytes(), enc) {
				t.Fatal("encoding is not canonical")
			}
			// Every directory's children are exactly the entries whose
			// parent it is, sorted.
			for i := range y.Entries {
				for _, c := range y.Children(i) {
					if y.Parent(int(c)) != i {
						t.Fatalf("child %d of %d has parent %d", c, i, y.Parent(int(c)))
					}
				}
			}
		})
	}
}

func TestEncodeRefusesInvalid(t *testing.T) {
	base := func() *layerindex.Index {
		x, _ := mustBuild(t, tarOf(t, 0, dir("d/"), reg("d/f", "content"), hardlink("d/h", "d/f"), symlink("s", "d/f"), reg("z", "")))
		return x
	}
	tests := []struct {
		name   string
		modify func(x *layerindex.Index)
	}{
		{"version", func(x *layerindex.Index) { x.Version = 2 }},
		{"unsorted", func(x *layerindex.Index) { x.Entries[1], x.Entries[2] = x.Entries[2], x.Entries[1] }},
		{"missing parent", func(x *layerindex.Index) { x.Entries = slices.Delete(x.Entries, 1, 2) }},
		{"no root", func(x *layerindex.Index) { x.Entries = x.Entries[1:] }},
		{"linkname on file", func(x *layerindex.Index) { x.Entries[2].Linkname = "x" }},
		{"opaque on file", func(x *layerindex.Index) { x.Entries[2].Opaque = true }},
		{"device numbers on symlink", func(x *layerindex.Index) { x.Entries[4].Devmajor = 1 }},
		{"hardlink with mode", func(x *layerindex.Index) { x.Entries[3].Mode = 0o644 }},
		{"hardlink to symlink", func(x *layerindex.Index) { x.Entries[3].Linkname = "s" }},
		{"content outside stream", func(x *layerindex.Index) { x.Entries[2].Offset = x.StreamSize }},
		{"empty file offset", func(x *layerindex.Index) { x.Entries[5].Offset = 1 }},
		{"bad digest", func(x *layerindex.Index) { x.Entries[2].Digest = "sha512:abc" }},
		{"unsorted xattrs", func(x *layerindex.Index) {
			x.Entries[2].Xattrs = []layerindex.Xattr{{Name: "user.b"}, {Name: "user.a"}}
		}},
		{"overlay xattr", func(x *layerindex.Index) {
			x.Entries[2].Xattrs = []layerindex.Xattr{{Name: "trusted.overlay.opaque", Value: "y"}}
		}},
		{"mode bits", func(x *layerindex.Index) { x.Entries[2].Mode = 0o170644 }},
		{"nanoseconds", func(x *layerindex.Index) { x.Entries[2].ModNsec = 1e9 }},
		{"frame offset", func(x *layerindex.Index) { x.Frames[0].COffset = 1 }},
		{"data size", func(x *layerindex.Index) { x.DataSize++ }},
		{"dot path", func(x *layerindex.Index) { x.Entries[1].Path = "." }},
		{"slash path", func(x *layerindex.Index) { x.Entries[4].Path = "s/" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x := base()
			if _, err := x.MarshalBinary(); err != nil {
				t.Fatalf("base index: %v", err)
			}
			tc.modify(x)
			_, err := x.MarshalBinary()
			if !errors.Is(err, layerindex.ErrInvalidIndex) {
				t.Fatalf("got %v, want ErrInvalidIndex", err)
			}
			t.Logf("refused: %v", err)
		})
	}
}

func TestDecodeRefusesInvalid(t *testing.T) {
	x, _ := mustBuild(t, tarOf(t, 0, dir("d/"), reg("d/f", "content"), hardlink("d/h", "d/f"), symlink("s", "d/f")))
	enc, err := x.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for n := range len(enc) {
		if _, err := layerindex.Decode(enc[:n]); !errors.Is(err, layerindex.ErrInvalidIndex) {
			t.Fatalf("prefix of %d bytes: got %v", n, err)
		}
	}
	if _, err := layerindex.Decode(append(slices.Clone(enc), 0)); !errors.Is(err, layerindex.ErrInvalidIndex) {
		t.Errorf("trailing byte: %v", err)
	}
	v2 := slices.Clone(enc)
	v2[8] = 2
	if _, err := layerindex.Decode(v2); !errors.Is(err, layerindex.ErrUnsupportedVersion) || !errors.Is(err, layerindex.ErrInvalidIndex) {
		t.Errorf("version 2: %v", err)
	}
	nonMinimal := slices.Concat(enc[:8], []byte{0x81, 0x00}, enc[9:])
	if _, err := layerindex.Decode(nonMinimal); !errors.Is(err, layerindex.ErrInvalidIndex) || !strings.Contains(err.Error(), "minimal") {
		t.Errorf("non-minimal varint: %v", err)
	}
	// Every single-byte change either fails cleanly or decodes into an
	// index that re-encodes to the same bytes.
	for i := range enc {
		for _, delta := range []byte{1, 0x80, 0xff} {
			m := slices.Clone(enc)
			m[i] += delta
			y, err := layerindex.Decode(m)
			if err != nil {
				if !errors.Is(err, layerindex.ErrInvalidIndex) {
					t.Fatalf("byte %d: error %v is not ErrInvalidIndex", i, err)
				}
				continue
			}
			re, err := y.MarshalBinary()
			if err != nil || !bytes.Equal(re, m) {
				t.Fatalf("byte %d: decoded but does not re-encode (%v)", i, err)
			}
		}
	}
}

func TestLookupChildren(t *testing.T) {
	x, _ := mustBuild(t, tarOf(t, 0, reg("a/z", ""), reg("a.b", ""), dir("a/b/"), reg("a/b/c", ""), reg("a/a", ""), reg("b", ""), hardlink("a/h", "a/z")))
	want := []string{"", "a", "a/a", "a/b", "a/b/c", "a/h", "a/z", "a.b", "b"}
	var got []string
	for _, e := range x.Entries {
		got = append(got, e.Path)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("order (-want +got):\n%s", diff)
	}
	for _, p := range []string{"a/b", "/a/b", "a/b/", "/a/b/"} {
		if i, ok := x.Lookup(p); !ok || x.Entries[i].Path != "a/b" {
			t.Errorf("Lookup(%q) = %d, %v", p, i, ok)
		}
	}
	for _, p := range []string{"", ".", "/"} {
		if i, ok := x.Lookup(p); !ok || i != 0 {
			t.Errorf("Lookup(%q) = %d, %v", p, i, ok)
		}
	}
	for _, p := range []string{"c", "a/b/c/d", "a/", "a//b"} {
		if _, ok := x.Lookup(p); ok && p != "a/" {
			t.Errorf("Lookup(%q) found", p)
		}
	}
	names := func(i int) []string {
		var out []string
		for _, c := range x.Children(i) {
			out = append(out, x.Entries[c].Path)
		}
		return out
	}
	if diff := cmp.Diff([]string{"a", "a.b", "b"}, names(0)); diff != "" {
		t.Errorf("children of root:\n%s", diff)
	}
	a, _ := x.Lookup("a")
	if diff := cmp.Diff([]string{"a/a", "a/b", "a/h", "a/z"}, names(a)); diff != "" {
		t.Errorf("children of a:\n%s", diff)
	}
	if x.Nlink(0) != 3 || x.Nlink(a) != 3 {
		t.Errorf("nlink root %d, a %d", x.Nlink(0), x.Nlink(a))
	}
	h, _ := x.Lookup("a/h")
	z, _ := x.Lookup("a/z")
	if x.Nlink(h) != 2 || x.Nlink(z) != 2 {
		t.Errorf("nlink h %d, z %d", x.Nlink(h), x.Nlink(z))
	}
	// The same answers from an index that was not decoded.
	y := &layerindex.Index{Entries: x.Entries}
	if diff := cmp.Diff(names(a), func() []string {
		var out []string
		for _, c := range y.Children(a) {
			out = append(out, y.Entries[c].Path)
		}
		return out
	}()); diff != "" {
		t.Errorf("children without tree:\n%s", diff)
	}
	if y.Parent(h) != a || y.Nlink(z) != 2 {
		t.Errorf("parent/nlink without tree: %d %d", y.Parent(h), y.Nlink(z))
	}
}

func TestFramesFor(t *testing.T) {
	x := &layerindex.Index{StreamSize: 300, Frames: []layerindex.Frame{
		{UOffset: 0, USize: 100}, {UOffset: 100, USize: 100}, {UOffset: 200, USize: 100},
	}}
	tests := []struct {
		off, n      int64
		first, last int
	}{
		{0, 1, 0, 0}, {0, 100, 0, 0}, {0, 101, 0, 1}, {99, 2, 0, 1}, {100, 100, 1, 1},
		{150, 1000, 1, 2}, {299, 1, 2, 2}, {0, 300, 0, 2}, {300, 1, 0, -1}, {5, 0, 0, -1}, {-1, 5, 0, -1},
	}
	for _, tc := range tests {
		first, last := x.FramesFor(tc.off, tc.n)
		if first != tc.first || last != tc.last {
			t.Errorf("FramesFor(%d, %d) = %d, %d; want %d, %d", tc.off, tc.n, first, last, tc.first, tc.last)
		}
	}
}

func TestDecodeFrame(t *testing.T) {
	content := bytes.Repeat([]byte("frame content "), 100000)
	x, data := mustBuild(t, tarOf(t, 0, regBytes("f", content, 0o644)))
	if len(x.Frames) < 2 {
		t.Fatalf("%d frames", len(x.Frames))
	}
	f := x.Frames[1]
	raw := data[f.COffset : f.COffset+f.CSize]
	got, err := x.DecodeFrame(1, raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, content[f.UOffset:f.UOffset+f.USize]) {
		t.Fatal("frame content differs")
	}
	bad := slices.Clone(raw)
	bad[len(bad)/2] ^= 1
	if _, err := x.DecodeFrame(1, bad); !errors.Is(err, layerindex.ErrInvalidFrame) {
		t.Errorf("corrupt frame: %v", err)
	}
	if _, err := x.DecodeFrame(0, raw); !errors.Is(err, layerindex.ErrInvalidFrame) {
		t.Errorf("wrong frame: %v", err)
	}
	if _, err := x.DecodeFrame(len(x.Frames), raw); !errors.Is(err, layerindex.ErrInvalidFrame) {
		t.Errorf("no such frame: %v", err)
	}
	// Bytes verified by the caller decode the same; sizes are still checked.
	if got, err := x.DecodeVerifiedFrame(1, raw); err != nil || !bytes.Equal(got, content[f.UOffset:f.UOffset+f.USize]) {
		t.Errorf("DecodeVerifiedFrame: %v", err)
	}
	if _, err := x.DecodeVerifiedFrame(1, raw[:len(raw)-1]); !errors.Is(err, layerindex.ErrInvalidFrame) {
		t.Errorf("DecodeVerifiedFrame of a short frame: %v", err)
	}
}
