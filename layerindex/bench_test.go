package layerindex_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/strata-oci/strata/layerindex"
)

// realisticIndex has n entries shaped like a distribution layer: about a
// tenth directories, mostly regular files a few KiB large, some symlinks,
// hardlinks and xattrs, paths 4 to 8 components deep.
func realisticIndex(n int) *layerindex.Index {
	r := rand.New(rand.NewPCG(100, 100000))
	words := []string{"usr", "lib", "share", "python3", "dist-packages", "site-packages", "x86_64-linux-gnu",
		"locale", "LC_MESSAGES", "doc", "man", "man1", "include", "bin", "etc", "node_modules", "src", "test", "__pycache__"}
	word := func() string {
		if r.IntN(2) == 0 {
			return words[r.IntN(len(words))]
		}
		return fmt.Sprintf("%s_%d.%s", words[r.IntN(len(words))], r.IntN(1000), []string{"py", "so.6", "pyc", "gz", "h", "txt"}[r.IntN(6)])
	}
	x := &layerindex.Index{
		Version:   layerindex.Version,
		Layer:     sha([]byte("layer")),
		DiffID:    sha([]byte("diff")),
		MediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
	}
	dirs := []string{""}
	isDir := map[string]bool{"": true}
	var list []string
	seen := map[string]bool{}
	for len(list) < n-1 {
		parent := dirs[r.IntN(len(dirs))]
		if r.IntN(2) > 0 && len(dirs) > 50 {
			parent = dirs[len(dirs)-1-r.IntN(50)] // locality, as in a real tree
		}
		p := word()
		if parent != "" {
			p = parent + "/" + p
		}
		if seen[p] {
			continue
		}
		seen[p] = true
		list = append(list, p)
		if r.IntN(10) == 0 && strings.Count(p, "/") < 7 {
			dirs = append(dirs, p)
			isDir[p] = true
		}
	}
	list = append(list, "")
	slices.SortFunc(list, layerindex.ComparePaths)
	var regs []string
	for _, p := range list {
		e := layerindex.Entry{Path: p, Mode: 0o644, ModTime: 1700000000 + r.Int64N(1000)}
		switch k := r.IntN(100); {
		case isDir[p]:
			e.Type, e.Mode = layerindex.TypeDir, 0o755
		case k < 8:
			e.Type, e.Mode, e.Linkname = layerindex.TypeSymlink, 0o777, "../lib/"+word()
		case k < 10 && len(regs) > 0:
			e = layerindex.Entry{Path: p, Type: layerindex.TypeHardlink, Linkname: regs[r.IntN(len(regs))]}
		default:
			e.Type = layerindex.TypeReg
			e.Size = 1 + r.Int64N(16<<10)
			e.Offset = x.StreamSize
			x.StreamSize += e.Size
			e.Digest = sha(fmt.Appendf(nil, "%d", len(regs)))
			regs = append(regs, p)
			if k == 99 {
				e.Xattrs = []layerindex.Xattr{{Name: "security.capability", Value: capNetRaw}}
			}
		}
		x.Entries = append(x.Entries, e)
	}
	for off := int64(0); off < x.StreamSize; off += layerindex.FrameSize {
		u := min(layerindex.FrameSize, x.StreamSize-off)
		x.Frames = append(x.Frames, layerindex.Frame{COffset: x.DataSize, CSize: u / 3, UOffset: off, USize: u, Digest: sha(fmt.Appendf(nil, "%d", off))})
		x.DataSize += u / 3
	}
	x.Data = sha([]byte("data"))
	return x
}

func BenchmarkDecode100k(b *testing.B) {
	enc, err := realisticIndex(100_000).MarshalBinary()
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(enc)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := layerindex.Decode(enc); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(enc))/100_000, "index-B/entry")
}

func BenchmarkEncode100k(b *testing.B) {
	x := realisticIndex(100_000)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := x.MarshalBinary(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLookup100k(b *testing.B) {
	x, err := layerindex.Decode(must(realisticIndex(100_000).MarshalBinary()))
	if err != nil {
		b.Fatal(err)
	}
	i := 0
	for b.Loop() {
		p := x.Entries[i%len(x.Entries)].Path
		if _, ok := x.Lookup(p); !ok {
			b.Fatal(p)
		}
		i += 7919
	}
}

func BenchmarkBuild(b *testing.B) {
	layer := gz(b, richLayer(b))
	plain := richLayer(b)
	b.SetBytes(int64(len(plain)))
	for b.Loop() {
		if _, err := layerindex.Build(b.Context(), bytes.NewReader(layer), discard{}, layerindex.Options{}); err != nil {
			b.Fatal(err)
		}
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
