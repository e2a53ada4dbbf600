package startup

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"slices"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/frames"
)

// fuzzPack packs spans of streams as a registry would, in chunks of at most
// chunk bytes (small, so that seeds of a few kilobytes have several), and
// returns the profile's JSON and the pack blob.
func fuzzPack(t testing.TB, streams [][]byte, spans [][3]int64, chunk int) ([]byte, []byte) {
	t.Helper()
	p := &api.Profile{Version: 1, Pack: &api.Pack{Spans: spans}}
	for i := range streams {
		p.Layers = append(p.Layers, api.ProfileLayer{Layer: digest.FromString("layer" + string(rune('a'+i))), Data: digest.FromString("data" + string(rune('a'+i)))})
	}
	var raw []byte
	for _, s := range spans {
		raw = append(raw, streams[s[0]][s[1]:s[1]+s[2]]...)
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	var blob []byte
	for len(raw) > 0 {
		n := min(len(raw), chunk)
		cb := enc.EncodeAll(raw[:n], nil)
		p.Pack.Chunks = append(p.Pack.Chunks, api.PackChunk{Size: int64(len(cb)), USize: int64(n), Digest: digest.FromBytes(cb)})
		blob = append(blob, cb...)
		raw = raw[n:]
	}
	p.Pack.Digest, p.Pack.Size = digest.FromBytes(blob), int64(len(blob))
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	return b, blob
}

// FuzzStartupPack decodes a start-up profile and its pack blob as a
// hostile registry would serve them (GET …/_strata/profiles/<m>, then the
// pack blob) and reads the layers' streams through the pack as the
// node's lazy layers do (checkPack, packLayers, packLayer.covers and
// read). Oracles: no panic; a pack the node takes covers a range exactly
// when its spans do, and a read it serves has the bytes a simple model
// of the pack (spans in order, chunks each verified and decompressed
// alone) gives, from chunks that match their digests only. The seeds run
// in every `go test`; to search:
//
//	go test -run '^$' -fuzz '^FuzzStartupPack$' -fuzztime 60s ./internal/startup/
func FuzzStartupPack(f *testing.F) {
	text := func(seed byte, n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = "strata lazy layers "[(i*int(seed)+i/7)%19]
		}
		return b
	}
	streams := [][]byte{text(3, 4000), text(5, 3000)}
	for _, s := range []struct {
		spans [][3]int64
		chunk int
	}{
		{[][3]int64{{0, 100, 500}, {1, 7, 100}, {0, 1000, 1500}, {1, 2000, 300}, {0, 1100, 10}}, 700},
		{[][3]int64{{0, 0, 4000}}, 1000},
		{[][3]int64{{1, 2999, 1}, {1, 0, 1}, {0, 3999, 1}}, 1},
		{[][3]int64{{0, 500, 600}, {0, 0, 500}, {1, 500, 100}, {1, 600, 100}}, 256},
	} {
		p, blob := fuzzPack(f, streams, s.spans, s.chunk)
		f.Add(p, blob)
	}
	f.Add([]byte(`{"version":1,"layers":[{"layer":"sha256:`+string(bytes.Repeat([]byte("a"), 64))+`"}],"pack":{"digest":"sha256:`+string(bytes.Repeat([]byte("b"), 64))+`","size":1,"spans":[[0,9223372036854775806,1]],"chunks":[{"size":1,"usize":1,"digest":"sha256:`+string(bytes.Repeat([]byte("c"), 64))+`"}]}}`), []byte{0})
	f.Fuzz(func(t *testing.T, profile, blob []byte) {
		var p api.Profile
		if json.Unmarshal(profile, &p) != nil || p.Pack == nil || checkPack(&p, p.Pack) != nil {
			return
		}
		k := p.Pack
		// The chunks as StartPack lays them out, each finished with its
		// bytes of the blob, or failed where the blob is short (a fetch
		// that failed).
		chunks := make([]*packChunk, len(k.Chunks))
		content := make([][]byte, len(k.Chunks)) // the model: nil where a chunk is bad
		failed := make([]bool, len(k.Chunks))    // did not arrive
		var off, at int64
		for i, c := range k.Chunks {
			chunks[i] = &packChunk{piece: &earlyPiece{Span: frames.Span{Off: off, Len: c.Size}, done: make(chan struct{})}, at: at, usize: c.USize, digest: c.Digest}
			if off+c.Size <= int64(len(blob)) {
				b := blob[off : off+c.Size]
				chunks[i].piece.finish(b, nil)
				if sum := sha256.Sum256(b); digest.NewDigestFromBytes(digest.SHA256, sum[:]) == c.Digest {
					if u, err := packDecoder.DecodeAll(b, nil); err == nil && int64(len(u)) == c.USize {
						content[i] = u
					}
				}
			} else {
				chunks[i].piece.finish(nil, context.DeadlineExceeded)
				failed[i] = true
			}
			off += c.Size
			at += c.USize
		}
		var layers []ocispec.Descriptor
		for _, l := range p.Layers {
			layers = append(layers, ocispec.Descriptor{Digest: l.Layer})
		}
		byData := packLayers(&p, chunks, layers)
		// model returns bytes want of a layer's stream, whether its
		// spans cover them, whether all their chunks arrived, and whether
		// they are good.
		model := func(pl *packLayer, want frames.Span) (b []byte, covered, arrived, good bool) {
			arrived, good = true, true
			for x := want.Off; x < want.End(); {
				i := slices.IndexFunc(pl.spans, func(s packSpan) bool { return s.Off <= x && x < s.End() })
				if i < 0 {
					return nil, false, false, false
				}
				s := pl.spans[i]
				for end := min(want.End(), s.End()); x < end; {
					pos := s.at + x - s.Off
					j, found := slices.BinarySearchFunc(chunks, pos, func(c *packChunk, pos int64) int { return cmp.Compare(c.at, pos) })
					if !found {
						j--
					}
					c := chunks[j]
					n := min(end-x, c.at+c.usize-pos)
					if failed[j] {
						arrived = false
					}
					if content[j] == nil {
						good = false
						b = append(b, make([]byte, n)...)
					} else {
						b = append(b, content[j][pos-c.at:pos-c.at+n]...)
					}
					x += n
				}
			}
			return b, true, arrived, good
		}
		for d, pl := range byData {
			var wants []frames.Span
			for i, s := range pl.spans {
				if i > 0 && pl.spans[i-1].End() > s.Off {
					t.Fatalf("data %s: spans %v and %v overlap", d, pl.spans[i-1].Span, s.Span)
				}
				if s.Len <= 0 || s.at < 0 || s.at+s.Len > at {
					t.Fatalf("data %s: span %+v outside the pack's %d bytes", d, s, at)
				}
				if s.Len <= 64<<10 {
					wants = append(wants, s.Span, frames.Span{Off: s.Off + s.Len/2, Len: s.Len}, frames.Span{Off: max(0, s.Off-1), Len: 2})
				}
			}
			for _, want := range wants {
				ref, covered, arrived, good := model(pl, want)
				// covers counts chunks on their way, or that arrived
				// bad, as covering: only a read verifies them.
				if got := pl.covers(want); got != (covered && arrived) {
					t.Fatalf("data %s: covers(%+v) = %v; spans cover it %v, chunks arrived %v", d, want, got, covered, arrived)
				}
				dest := make([]byte, want.Len)
				ok := pl.read(context.Background(), dest, want.Off)
				if ok != (covered && good) {
					t.Fatalf("data %s: read %+v: %v; covered %v, chunks good %v", d, want, ok, covered, good)
				}
				if ok && !bytes.Equal(dest, ref) {
					t.Fatalf("data %s: read %+v served the wrong bytes", d, want)
				}
			}
		}
	})
}
