package startup

import (
	"bytes"
	"context"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/frames"
)

// testPack packs spans of streams (by layer index) as a registry would and
// returns the profile and the compressed chunks.
func testPack(t *testing.T, streams [][]byte, spans [][3]int64) (*api.Profile, [][]byte) {
	t.Helper()
	p := &api.Profile{Pack: &api.Pack{Spans: spans}}
	for i := range streams {
		p.Layers = append(p.Layers, api.ProfileLayer{Layer: digest.FromString("layer" + string(rune('a'+i))), Data: digest.FromString("data" + string(rune('a'+i)))})
	}
	var raw []byte
	for _, s := range spans {
		raw = append(raw, streams[s[0]][s[1]:s[1]+s[2]]...)
	}
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	var chunks [][]byte
	var blob []byte
	for len(raw) > 0 {
		n := min(len(raw), api.PackChunkSize)
		cb := enc.EncodeAll(raw[:n], nil)
		p.Pack.Chunks = append(p.Pack.Chunks, api.PackChunk{Size: int64(len(cb)), USize: int64(n), Digest: digest.FromBytes(cb)})
		chunks = append(chunks, cb)
		blob = append(blob, cb...)
		raw = raw[n:]
	}
	p.Pack.Digest, p.Pack.Size = digest.FromBytes(blob), int64(len(blob))
	return p, chunks
}

func TestPackLayer(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	streams := make([][]byte, 2)
	for i := range streams {
		streams[i] = make([]byte, 400<<10)
		for j := range streams[i] {
			streams[i][j] = byte(r.IntN(16)) // compressible
		}
	}
	// Spans in first-read order, across layers, one straddling chunks;
	// the last overlaps the first and is dropped.
	spans := [][3]int64{{0, 200000, 50000}, {1, 7, 100}, {0, 1000, 150000}, {1, 300000, 4096}, {0, 210000, 10}}
	p, chunks := testPack(t, streams, spans)
	if err := checkPack(p, p.Pack); err != nil {
		t.Fatal(err)
	}
	pieces := make([]*packChunk, len(chunks))
	var at int64
	for i, c := range p.Pack.Chunks {
		pieces[i] = &packChunk{piece: &earlyPiece{Span: frames.Span{Len: c.Size}, done: make(chan struct{})}, at: at, usize: c.USize, digest: c.Digest}
		at += c.USize
	}
	layers := []ocispec.Descriptor{{Digest: p.Layers[0].Layer}, {Digest: p.Layers[1].Layer}}
	byData := packLayers(p, pieces, layers)
	l0, l1 := byData[p.Layers[0].Data], byData[p.Layers[1].Data]
	if l0 == nil || l1 == nil || len(l0.spans) != 2 || len(l1.spans) != 2 {
		t.Fatalf("pack layers %+v %+v", l0, l1)
	}

	// Covered ranges are covered while their chunks are on their way,
	// and a read waits for them.
	if !l0.covers(frames.Span{Off: 1000, Len: 150000}) || !l0.covers(frames.Span{Off: 200000, Len: 50000}) || l0.covers(frames.Span{Off: 900, Len: 200}) || l0.covers(frames.Span{Off: 150000, Len: 60000}) || !l1.covers(frames.Span{Off: 300000, Len: 4096}) {
		t.Error("covers answers wrongly")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if l0.read(ctx, make([]byte, 100), 2000) {
		t.Error("a read of chunks not there did not wait")
	}
	cancel()
	go func() {
		for i, c := range pieces {
			c.piece.finish(chunks[i], nil)
		}
	}()
	for _, rd := range []struct {
		l      *packLayer
		layer  int
		off, n int64
		want   bool
	}{
		{l0, 0, 1000, 150000, true},   // a whole span, over two chunks
		{l0, 0, 140000, 70000, false}, // runs past the span
		{l0, 0, 200100, 4096, true},
		{l1, 1, 7, 100, true},
		{l1, 1, 301000, 96, true},
		{l1, 1, 0, 10, false},
	} {
		dest := make([]byte, rd.n)
		ok := rd.l.read(context.Background(), dest, rd.off)
		if ok != rd.want || ok && !bytes.Equal(dest, streams[rd.layer][rd.off:rd.off+rd.n]) {
			t.Errorf("read layer %d %d+%d: %v (content equal %v), want %v", rd.layer, rd.off, rd.n, ok, bytes.Equal(dest, streams[rd.layer][rd.off:rd.off+rd.n]), rd.want)
		}
	}

	// A chunk that does not match its digest is not served: the reads it
	// holds go to the frames.
	bad := &packChunk{piece: &earlyPiece{done: make(chan struct{})}, usize: pieces[0].usize, digest: pieces[0].digest}
	corrupt := append([]byte{}, chunks[0]...)
	corrupt[len(corrupt)/2] ^= 1
	bad.piece.finish(corrupt, nil)
	l := &packLayer{spans: l0.spans, chunks: append([]*packChunk{bad}, pieces[1:]...)}
	if l.read(context.Background(), make([]byte, 10), 2000) {
		t.Error("a corrupt chunk was served")
	}
	// A failed fetch: not covered any more.
	failed := &packChunk{piece: &earlyPiece{done: make(chan struct{})}, usize: pieces[0].usize}
	failed.piece.finish(nil, context.DeadlineExceeded)
	l = &packLayer{spans: l0.spans, chunks: append([]*packChunk{failed}, pieces[1:]...)}
	if l.covers(frames.Span{Off: 1000, Len: 10}) {
		t.Error("a failed chunk still covers its bytes")
	}
}

func TestCheckPack(t *testing.T) {
	streams := [][]byte{make([]byte, 1000)}
	good, _ := testPack(t, streams, [][3]int64{{0, 0, 100}})
	if err := checkPack(good, good.Pack); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(k *api.Pack){
		"no chunks":         func(k *api.Pack) { k.Chunks = nil },
		"size":              func(k *api.Pack) { k.Size++ },
		"span of no layer":  func(k *api.Pack) { k.Spans[0][0] = 1 },
		"spans past chunks": func(k *api.Pack) { k.Spans[0][2]++ },
		"chunk too big":     func(k *api.Pack) { k.Chunks[0].USize = api.PackChunkSize + 1 },
		"negative offset":   func(k *api.Pack) { k.Spans[0][1] = -1 },
		"no digest":         func(k *api.Pack) { k.Digest = "" },
		"huge chunk":        func(k *api.Pack) { k.Chunks[0].Size, k.Size = 1<<40, 1<<40 },
		"spans that wrap": func(k *api.Pack) {
			k.Spans = [][3]int64{{0, 0, math.MaxInt64}, {0, 0, math.MaxInt64}, {0, 0, k.Chunks[0].USize + 2}}
		},
		"span past int64": func(k *api.Pack) { k.Spans[0][1] = math.MaxInt64 - 10 },
		"too many chunks": func(k *api.Pack) {
			for len(k.Chunks) <= api.MaxPackBytes/api.PackChunkSize+1 {
				k.Chunks = append(k.Chunks, k.Chunks[0])
			}
		},
	} {
		p, _ := testPack(t, streams, [][3]int64{{0, 0, 100}})
		mod(p.Pack)
		if checkPack(p, p.Pack) == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
