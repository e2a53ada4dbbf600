package layerindex_test

import (
	"archive/tar"
	"bytes"
	"io"
	"math/rand/v2"
	"path"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/layerindex"
)

// capNetRaw is a valid security.capability value (v2, cap_net_raw
// permitted and effective).
const capNetRaw = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// richLayer has every kind of entry once, in an order a tar writer would
// use (parents first, no duplicates), so that extracting it with any tool
// gives the same tree as the index describes.
func richLayer(t testing.TB) []byte {
	r := rand.New(rand.NewPCG(42, 42))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			if i%3 == 0 {
				b[i] = byte(r.UintN(256))
			} else {
				b[i] = byte('a' + i%17)
			}
		}
		return b
	}
	at := func(e ent, sec int64, nsec int64) ent { e.hdr.ModTime = time.Unix(sec, nsec); return e }
	own := func(e ent, uid, gid int) ent { e.hdr.Uid, e.hdr.Gid = uid, gid; return e }
	mode := func(e ent, m int64) ent { e.hdr.Mode = m; return e }
	longDir := strings.Repeat("deep/", 25)
	ents := []ent{
		at(mode(dir("./"), 0o755), 1600000000, 0),
		dir("bin/"),
		regBytes("bin/su", []byte("\x7fELF setuid"), 0o4755),
		regBytes("bin/wall", []byte("\x7fELF setgid"), 0o2755),
		hardlink("bin/su-link", "bin/su"),
		withXattrs(regBytes("bin/ping", []byte("\x7fELF ping"), 0o755), "security.capability", capNetRaw),
		mode(dir("tmp/"), 0o1777),
		dir("etc/"),
		reg("etc/empty", ""),
		at(own(withXattrs(reg("etc/hosts", "127.0.0.1 localhost\n"), "user.comment", "hosts file", "user.bin", "\x00\xff\x01"), 0, 0), 1234567890, 123456789),
		at(reg("etc/old", "from the past"), -86400*365, 0), // GNU tar misreads negative fractions
		at(reg("etc/future", "from the future"), 4102444800, 999999999),
		own(regBytes("etc/shadow", []byte("root:*:"), 0o640), 0, 42),
		symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
		symlink("etc/dangling", "../nowhere"),
		symlink("etc/longlink", strings.Repeat("../", 60)+"target"),
		dir("usr/"),
		withXattrs(dir("usr/lib/"), "user.dirattr", "yes", "trusted.overlay.opaque", "y", "user.overlay.origin", "x"),
		regBytes("usr/lib/big", random(3<<20+12345), 0o644),
		hardlink("usr/lib/big-link", "usr/lib/big"),
		regBytes("usr/lib/exact", bytes.Repeat([]byte{7}, layerindex.FrameSize), 0o600),
		own(regBytes("usr/lib/owned", []byte("x"), 0o644), 100000, 65534),
		own(mode(dir("home/"), 0o750), 1000, 1000),
		dir("home/user/"),
	}
	for d := "deep/"; len(d) <= len(longDir); d += "deep/" {
		ents = append(ents, dir("home/user/"+d))
	}
	ents = append(ents,
		regBytes("home/user/"+longDir+strings.Repeat("n", 150), []byte("long name"), 0o644),
		dir("dev/"),
		ent{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: epoch}},
		ent{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/loop0", Mode: 0o660, Devmajor: 7, Devminor: 0, Gid: 6, ModTime: epoch}},
		dir("run/"),
		ent{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "run/fifo", Mode: 0o600, ModTime: epoch}},
		dir("wh/"),
		reg("wh/.wh.gone", ""),
		dir("opaque/"),
		reg("opaque/.wh..wh..opq", ""),
		reg("opaque/kept", "kept"),
		dir("many/"),
	)
	for i := range 60 {
		ents = append(ents, regBytes(path.Join("many", strings.Repeat("f", 1+i%7)+string(rune('a'+i%26))+string(rune('0'+i/26))), random(r.IntN(40<<10)), 0o644))
	}
	return tarOf(t, tar.FormatPAX, ents...)
}

// expectFromTar derives the index entries a tar without duplicates should
// give, reading it with archive/tar.
func expectFromTar(t *testing.T, layer []byte) (want []layerindex.Entry, content map[string][]byte) {
	t.Helper()
	content = map[string][]byte{}
	byPath := map[string]*layerindex.Entry{}
	add := func(e layerindex.Entry) {
		if old, ok := byPath[e.Path]; ok {
			*old = e
			return
		}
		want = append(want, e)
		byPath[e.Path] = &want[len(want)-1]
	}
	add(layerindex.Entry{Path: "", Type: layerindex.TypeDir, Mode: layerindex.ImpliedDirMode})
	tr := tar.NewReader(bytes.NewReader(layer))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := strings.Trim(path.Clean("/"+hdr.Name), "/")
		dir, base := path.Split(p)
		dir = strings.TrimSuffix(dir, "/")
		if base == ".wh..wh..opq" {
			byPath[dir].Opaque = true
			continue
		}
		if name, ok := strings.CutPrefix(base, ".wh."); ok {
			add(layerindex.Entry{Path: path.Join(dir, name), Type: layerindex.TypeWhiteout})
			continue
		}
		e := layerindex.Entry{Path: p, Mode: uint32(hdr.Mode & 0o7777), UID: uint32(hdr.Uid), GID: uint32(hdr.Gid),
			ModTime: hdr.ModTime.Unix(), ModNsec: uint32(hdr.ModTime.Nanosecond())}
		for k, v := range hdr.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok && !strings.Contains(name, ".overlay.") {
				e.Xattrs = append(e.Xattrs, layerindex.Xattr{Name: name, Value: v})
			}
		}
		sort.Slice(e.Xattrs, func(i, j int) bool { return e.Xattrs[i].Name < e.Xattrs[j].Name })
		switch hdr.Typeflag {
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			e.Type, e.Size, e.Digest = layerindex.TypeReg, int64(len(b)), sha(b)
			content[p] = b
		case tar.TypeDir:
			e.Type = layerindex.TypeDir
		case tar.TypeSymlink:
			e.Type, e.Linkname = layerindex.TypeSymlink, hdr.Linkname
		case tar.TypeLink:
			e = layerindex.Entry{Path: p, Type: layerindex.TypeHardlink, Linkname: hdr.Linkname}
			content[p] = content[hdr.Linkname]
		case tar.TypeChar:
			e.Type, e.Devmajor, e.Devminor = layerindex.TypeChar, uint32(hdr.Devmajor), uint32(hdr.Devminor)
		case tar.TypeBlock:
			e.Type, e.Devmajor, e.Devminor = layerindex.TypeBlock, uint32(hdr.Devmajor), uint32(hdr.Devminor)
		case tar.TypeFifo:
			e.Type = layerindex.TypeFIFO
		default:
			t.Fatalf("unexpected type %q", hdr.Typeflag)
		}
		add(e)
	}
	sort.Slice(want, func(i, j int) bool { return layerindex.ComparePaths(want[i].Path, want[j].Path) < 0 })
	return want, content
}

// TestEquivalenceArchiveTar compares the index with a reading of the same
// tar through archive/tar.
func TestEquivalenceArchiveTar(t *testing.T) {
	layer := richLayer(t)
	x, data := mustBuild(t, layer)
	want, content := expectFromTar(t, layer)
	// Offsets are the builder's business; everything else must agree.
	got := make([]layerindex.Entry, len(x.Entries))
	copy(got, x.Entries)
	for i := range got {
		got[i].Offset = 0
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("entries differ (-archive/tar +index):\n%s", diff)
	}
	for p, b := range content {
		checkContent(t, x, data, p, b)
	}
	if len(x.Frames) < 5 {
		t.Errorf("only %d frames for a multi-MiB layer", len(x.Frames))
	}
	for i, f := range x.Frames {
		if f.USize > layerindex.FrameSize || (i < len(x.Frames)-1 && f.USize < layerindex.FrameMinCut) {
			t.Errorf("frame %d has %d bytes", i, f.USize)
		}
	}
}

// TestDeterminism builds the same tar twice, and gzip-, zstd-compressed
// and plain: the expansion is byte-identical but for the layer digest and
// the media type, which name the blob.
func TestDeterminism(t *testing.T) {
	plain := richLayer(t)
	x1, d1 := mustBuild(t, plain)
	x2, d2 := mustBuild(t, plain)
	e1, err := x1.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	e2, _ := x2.MarshalBinary()
	if !bytes.Equal(e1, e2) || !bytes.Equal(d1, d2) {
		t.Fatal("two builds of the same layer differ")
	}
	if richAgain := richLayer(t); !bytes.Equal(richAgain, plain) {
		t.Fatal("test layer generator is not deterministic")
	}
	for name, layer := range map[string][]byte{"gzip": gz(t, plain), "zstd": zst(t, plain)} {
		t.Run(name, func(t *testing.T) {
			x, d := mustBuild(t, layer)
			if !bytes.Equal(d, d1) {
				t.Error("data blob differs")
			}
			if diff := cmp.Diff(x1.Entries, x.Entries); diff != "" {
				t.Errorf("entries differ:\n%s", diff)
			}
			if diff := cmp.Diff(x1.Frames, x.Frames); diff != "" {
				t.Errorf("frames differ:\n%s", diff)
			}
			if x.DiffID != x1.DiffID || x.Data != x1.Data {
				t.Error("diff ID or data digest differs")
			}
			if x.Layer == x1.Layer || x.Layer != sha(layer) {
				t.Errorf("layer digest %s", x.Layer)
			}
			if !strings.HasSuffix(x.MediaType, "+"+name) {
				t.Errorf("media type %s", x.MediaType)
			}
			// With the media type given, only the layer digest differs.
			x3, _, err := build(t, layer, layerindex.Options{MediaType: x1.MediaType})
			if err != nil {
				t.Fatal(err)
			}
			x3.Layer = x1.Layer
			if e3, _ := x3.MarshalBinary(); !bytes.Equal(e3, e1) {
				t.Error("index differs in more than the layer digest")
			}
		})
	}
}
