package startup

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/internal/remote"
)

func TestEarlyBlobRead(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789"), 100)
	piece := func(off, n int64) *earlyPiece {
		p := &earlyPiece{Span: frames.Span{Off: off, Len: n}, done: make(chan struct{}), b: data[off : off+n]}
		close(p.done)
		return p
	}
	eb := &earlyBlob{pieces: []*earlyPiece{piece(0, 100), piece(100, 50), piece(300, 100)}}
	for _, tc := range []struct {
		off, n int64
		ok     bool
	}{
		{0, 100, true}, {10, 20, true}, {90, 50, true}, // within one piece, across two adjacent
		{140, 20, false}, // past the second piece
		{200, 10, false}, // in no piece
		{350, 50, true},
		{350, 60, false}, // past the last
	} {
		b, ok := eb.read(context.Background(), frames.Span{Off: tc.off, Len: tc.n})
		if ok != tc.ok || (ok && !bytes.Equal(b, data[tc.off:tc.off+tc.n])) {
			t.Errorf("read(%d, %d) = %q, %v; want ok %v", tc.off, tc.n, b, ok, tc.ok)
		}
	}
	// A failed piece is not used.
	bad := &earlyPiece{Span: frames.Span{Off: 0, Len: 10}, done: make(chan struct{}), err: context.Canceled}
	close(bad.done)
	if _, ok := (&earlyBlob{pieces: []*earlyPiece{bad}}).read(context.Background(), frames.Span{Len: 10}); ok {
		t.Error("a failed piece was used")
	}
	// A reader that gives up does not wait for a piece.
	slow := &earlyPiece{Span: frames.Span{Off: 0, Len: 10}, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, ok := (&earlyBlob{pieces: []*earlyPiece{slow}}).read(ctx, frames.Span{Len: 10}); ok {
		t.Error("a cancelled reader got bytes of an unfinished piece")
	}
}

func TestCutChunksStale(t *testing.T) {
	// A blob read once early and once much later: the late frame does not
	// ride in the early chunk.
	a, b := digest.FromString("a"), digest.FromString("b")
	items := []earlyItem{{blob: a, p: &earlyPiece{Span: frames.Span{Off: 0, Len: 100}}, rank: 0}}
	for i := range 20 {
		items = append(items, earlyItem{blob: b, p: &earlyPiece{Span: frames.Span{Off: int64(i) << 17, Len: 100 << 10}}, rank: 1 + i})
	}
	items = append(items, earlyItem{blob: a, p: &earlyPiece{Span: frames.Span{Off: 1000, Len: 100}}, rank: 21})
	chunks := cutChunks(items)
	if c := chunks[0]; c.blob != a || len(c.pieces) != 1 {
		t.Errorf("first chunk: %s with %d frames, want the first frame of a alone", c.blob, len(c.pieces))
	}
	if c := chunks[len(chunks)-1]; c.blob != a || c.pieces[0].Off != 1000 {
		t.Errorf("last chunk: %s at %d, want a's late frame", c.blob, c.pieces[0].Off)
	}
}

func TestRankProfile(t *testing.T) {
	p := &api.Profile{Layers: []api.ProfileLayer{{Frames: []int{5, 1, 9}}, {Frames: []int{2, 7}}}}
	n := rankProfile(p, [][]uint64{{10, 30, 50}, {20, 40}}, [][]uint64{{11, 12}, {5}})
	if n != 5 {
		t.Errorf("rankProfile = %d, want 5", n)
	}
	if !slices.Equal(p.Layers[0].Ranks, []int{0, 2, 4}) || !slices.Equal(p.Layers[1].Ranks, []int{1, 3}) {
		t.Errorf("ranks %v %v, want [0 2 4] [1 3]", p.Layers[0].Ranks, p.Layers[1].Ranks)
	}
	if !slices.Equal(p.Layers[0].PageRanks, []int{1, 2}) || !slices.Equal(p.Layers[1].PageRanks, []int{0}) {
		t.Errorf("page ranks %v %v, want [1 2] [0]", p.Layers[0].PageRanks, p.Layers[1].PageRanks)
	}
}

// TestEarlyMemoryBounded: early fetches of many starts at once hold at
// most Options.EarlyMax bytes; a profile past it is not fetched early
// (its layers read on demand). Before, every profile's frames were held
// for a minute, with no total bound.
func TestEarlyMemoryBounded(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	s := New(Options{Client: remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)}), EarlyMax: 3 << 20})
	repo := remote.Repository{Registry: srv.Listener.Addr().String(), Name: "app"}
	for i := range 5 {
		layer, data := digest.FromString(fmt.Sprint("layer", i)), digest.FromString(fmt.Sprint("data", i))
		p := &api.Profile{Layers: []api.ProfileLayer{{Layer: layer, Data: data, Frames: []int{0, 1}, Ranges: [][2]int64{{0, 512 << 10}, {512 << 10, 512 << 10}}}}}
		s.fetchEarly(repo, p, []ocispec.Descriptor{{Digest: layer}}, nil)
	}
	s.mu.Lock()
	n := len(s.early)
	s.mu.Unlock()
	if n != 3 || s.EarlyHeld() != 3<<20 {
		t.Errorf("%d early blobs holding %d bytes, want 3 of 1 MiB within the 3 MiB budget", n, s.EarlyHeld())
	}
}
