package layerfs_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/layerindex"
)

// pageSource is a memSource that also holds bytes [lo, hi) of the layer's
// uncompressed stream, as a start-up pack would.
type pageSource struct {
	*memSource
	stream []byte
	lo, hi int64
}

func (s *pageSource) CoversPages(off, n int64) bool { return off >= s.lo && off+n <= s.hi }

func (s *pageSource) ReadPages(ctx context.Context, dest []byte, off int64) bool {
	if !s.CoversPages(off, int64(len(dest))) {
		return false
	}
	copy(dest, s.stream[off:])
	return true
}

// TestPageSource: reads of bytes the source holds as pages are served
// from them, putting files into the cache included; the others fetch
// frames; a recording lists the bytes read, all of them.
func TestPageSource(t *testing.T) {
	files := map[string][]byte{
		"a/small": random(1, 10<<10),
		"a/big":   random(2, 300<<10),
		"b/other": random(3, 400<<10),
	}
	ix, data := build(t, tarOf(t, dir("a", 0o755), file("a/small", 0o644, files["a/small"]), file("a/big", 0o644, files["a/big"]),
		dir("b", 0o755), file("b/other", 0o644, files["b/other"])))
	stream := make([]byte, ix.StreamSize)
	entry := func(p string) *layerindex.Entry {
		i, ok := ix.Lookup(p)
		if !ok {
			t.Fatalf("no %s in the index", p)
		}
		return &ix.Entries[i]
	}
	for p, b := range files {
		copy(stream[entry(p).Offset:], b)
	}
	small, big := entry("a/small"), entry("a/big")
	lo, hi := min(small.Offset, big.Offset), max(small.Offset+small.Size, big.Offset+big.Size)
	for _, passthrough := range []bool{true, false} {
		name := map[bool]string{true: "passthrough", false: "served"}[passthrough]
		t.Run(name, func(t *testing.T) {
			src := &pageSource{memSource: &memSource{data: data}, stream: stream, lo: lo, hi: hi}
			f, mnt := mount(t, ix, src, openCache(t, t.TempDir(), 0), layerfs.Options{DisablePassthrough: !passthrough, MissWindow: -1, Readahead: -1})
			for _, p := range []string{"a/small", "a/big"} {
				if got := readFile(t, filepath.Join(mnt, p)); !bytes.Equal(got, files[p]) {
					t.Fatalf("%s: content differs", p)
				}
			}
			st := f.Stats()
			if src.requests.Load() != 0 || st.PageReads == 0 {
				t.Errorf("reading files the pages hold: %d requests to the source, %d page reads; want 0, some", src.requests.Load(), st.PageReads)
			}
			if passthrough && st.PassthroughOpens != 2 {
				t.Errorf("%d passthrough opens, want 2 (put into the cache from the pages)", st.PassthroughOpens)
			}
			// A recording start does not put files over 64 KiB into the
			// cache: it sees only the reads that come to it.
			f.StartRecording()
			if got := readFile(t, filepath.Join(mnt, "b/other")); !bytes.Equal(got, files["b/other"]) {
				t.Fatal("b/other: content differs")
			}
			if src.requests.Load() == 0 {
				t.Error("a file the pages do not hold was read without fetching")
			}
			rec := f.StopRecording()
			var n int64
			for _, r := range rec.Pages {
				n += r[1]
			}
			if want := entry("b/other").Size; n != want || len(rec.PageSeq) != len(rec.Pages) {
				t.Errorf("recorded %d bytes in %d ranges (%d sequence numbers), want %d", n, len(rec.Pages), len(rec.PageSeq), want)
			}
		})
	}
}
