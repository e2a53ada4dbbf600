package startup

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/internal/remote"
)

// An earlyBlob holds the frames of a data blob that a start-up profile
// lists, fetched before the layer's index arrived. The layer's reads take
// them from here (source) instead of asking the registry again; the
// layer file system verifies them against the index like any bytes.
type earlyBlob struct {
	pieces []*earlyPiece // by offset, not overlapping
}

// An earlyPiece is one range of the blob (a frame); done is closed when b
// or err is set.
type earlyPiece struct {
	frames.Span
	done chan struct{}
	b    []byte
	err  error
}

func (p *earlyPiece) finish(b []byte, err error) {
	select {
	case <-p.done:
		return
	default:
	}
	p.b, p.err = b, err
	close(p.done)
}

// The early fetch of a profile goes out in requests of up to earlyChunkMax
// bytes (several ranges of one blob each, in one multi-range request),
// first-read first. Before the image's indexes are in, only earlyHead
// bytes go out: an index is needed before any frame, and while its request
// is on its way, a head of frames keeps the link busy; then earlyStreams
// requests are kept in flight. A chunk takes no frame read more than
// earlyStale bytes (of the whole profile) after its first, so a blob that
// is read rarely does not pull late frames forward. Pieces are kept
// earlyKeep.
const (
	earlyHead     = 256 << 10
	earlyChunkMax = 256 << 10
	earlyStale    = 1 << 20
	earlyStreams  = 4
	earlyGate     = 30 * time.Second
	earlyKeep     = time.Minute
	earlyMaxPiece = 1 << 20
)

// An earlyChunk is one request of an early fetch.
type earlyChunk struct {
	blob   digest.Digest
	pieces []*earlyPiece // first-read first
	first  int           // place of its first piece in the profile's order
	bytes  int64
}

// fetchEarly starts fetching the frames profile p lists for the layers of
// the image, from repo, in the order the image's containers first read
// them (the profile's ranks; without them, layer by layer), and keeps them
// for earlyKeep. Beyond a head, the requests wait for indexes to be
// closed (the image's indexes are in).
func (s *Profiles) fetchEarly(repo remote.Repository, p *api.Profile, layers []ocispec.Descriptor, indexes <-chan struct{}) {
	var items []earlyItem
	s.mu.Lock()
	for _, pl := range p.Layers {
		if len(pl.Ranges) == 0 || len(pl.Ranges) != len(pl.Frames) || s.early[pl.Data] != nil ||
			!slices.ContainsFunc(layers, func(d ocispec.Descriptor) bool { return d.Digest == pl.Layer }) {
			continue
		}
		ranked := len(pl.Ranks) == len(pl.Frames)
		eb := &earlyBlob{}
		for i, r := range pl.Ranges {
			if r[0] < 0 || r[1] <= 0 || r[1] > earlyMaxPiece {
				continue // not a frame of a real index
			}
			rank := i
			if ranked {
				rank = pl.Ranks[i]
			}
			piece := &earlyPiece{Span: frames.Span{Off: r[0], Len: r[1]}, done: make(chan struct{})}
			eb.pieces = append(eb.pieces, piece)
			items = append(items, earlyItem{pl.Data, piece, rank})
		}
		slices.SortFunc(eb.pieces, func(a, b *earlyPiece) int { return cmp.Compare(a.Off, b.Off) })
		// Ranges that overlap (or repeat) are not from a real index:
		// only the first is kept.
		kept := eb.pieces[:0]
		drop := map[*earlyPiece]bool{}
		for _, piece := range eb.pieces {
			if n := len(kept); n > 0 && kept[n-1].End() > piece.Off {
				drop[piece] = true
				continue
			}
			kept = append(kept, piece)
		}
		eb.pieces = kept
		var size int64
		for _, piece := range kept {
			size += piece.Len
		}
		if !s.reserve(size) {
			// Over the memory budget: this layer reads on demand.
			items = slices.DeleteFunc(items, func(it earlyItem) bool { return it.blob == pl.Data })
			s.log.Info("early fetch skipped: over the memory budget", "layer", pl.Layer, "bytes", size, "held", s.held.Load(), "max", s.opts.EarlyMax)
			continue
		}
		items = slices.DeleteFunc(items, func(it earlyItem) bool { return drop[it.p] })
		s.early[pl.Data] = eb
		time.AfterFunc(earlyKeep, func() {
			s.mu.Lock()
			if s.early[pl.Data] == eb {
				delete(s.early, pl.Data)
			}
			s.mu.Unlock()
			s.held.Add(-size)
		})
	}
	s.mu.Unlock()
	if len(items) == 0 {
		return
	}
	s.fetchChunks(repo, cutChunks(items), indexes)
}

// fetchChunks fetches chunks in order, in the background: a head of them
// at once, the others once indexes is closed (nil: at once), earlyStreams
// at a time.
func (s *Profiles) fetchChunks(repo remote.Repository, chunks []*earlyChunk, indexes <-chan struct{}) {
	go func() {
		var head []*earlyChunk
		var n int64
		for len(chunks) > 0 && (len(head) == 0 || n+chunks[0].bytes <= earlyHead) {
			head = append(head, chunks[0])
			n += chunks[0].bytes
			chunks = chunks[1:]
		}
		for _, c := range head {
			go s.fetchChunk(repo, c)
		}
		if indexes != nil {
			gate := time.NewTimer(earlyGate)
			select {
			case <-indexes:
			case <-gate.C:
			}
			gate.Stop()
		}
		queue := make(chan *earlyChunk, len(chunks))
		for _, c := range chunks {
			queue <- c
		}
		close(queue)
		for range min(earlyStreams, len(chunks)) {
			go func() {
				for c := range queue {
					s.fetchChunk(repo, c)
				}
			}()
		}
	}()
}

// An earlyItem is a frame of a profile to fetch early, with its rank.
type earlyItem struct {
	blob digest.Digest
	p    *earlyPiece
	rank int
}

// cutChunks orders items by rank and cuts them into the requests of an
// early fetch, in the order they go out (frames.Batches): each holds
// frames of one blob, at most earlyChunkMax bytes of them (or one frame),
// none read more than earlyStale bytes after the chunk's first.
func cutChunks(items []earlyItem) []*earlyChunk {
	wants := make([]frames.Want, len(items))
	for i, it := range items {
		wants[i] = frames.Want{Blob: it.blob, Span: it.p.Span, Rank: it.rank}
	}
	var chunks []*earlyChunk
	for _, b := range frames.Batches(wants, earlyChunkMax, earlyStale) {
		c := &earlyChunk{blob: b.Blob, first: b.First, bytes: b.Bytes}
		for _, i := range b.Wants {
			c.pieces = append(c.pieces, items[i].p)
		}
		chunks = append(chunks, c)
	}
	return chunks
}

// fetchChunk fetches the pieces of c with one request, each piece ready as
// soon as its bytes are in; or piece by piece from a registry that does
// not serve several ranges in one response.
func (s *Profiles) fetchChunk(repo remote.Repository, c *earlyChunk) {
	ctx, cancel := context.WithTimeout(context.Background(), attemptTimeout(s.opts.FetchTimeout)+10*time.Second)
	defer cancel()
	ranges := make([][2]int64, len(c.pieces))
	for i, p := range c.pieces {
		ranges[i] = [2]int64{p.Off, p.Len}
	}
	start := time.Now()
	err := s.client.ReadRanges(ctx, repo, c.blob, ranges, func(i int, b []byte) { c.pieces[i].finish(b, nil) })
	s.log.Debug("early fetch", "blob", c.blob, "frames", len(c.pieces), "bytes", c.bytes, "took", time.Since(start), "err", err)
	if errors.Is(err, remote.ErrUnsupported) {
		for _, p := range c.pieces {
			p.finish(s.client.ReadRange(ctx, repo, c.blob, p.Off, p.Len))
		}
		return
	}
	if err == nil {
		err = errors.New("range missing from the response")
	}
	for _, p := range c.pieces {
		p.finish(nil, err) // those not handed over
	}
}

// covers reports whether pieces that have not failed cover bytes want of
// the blob (they may still be on their way).
func (eb *earlyBlob) covers(want frames.Span) bool {
	parts, ok := eb.parts(want)
	if !ok {
		return false
	}
	for _, p := range parts {
		select {
		case <-p.done:
			if p.err != nil {
				return false
			}
		default:
		}
	}
	return true
}

// parts returns the pieces that cover bytes want, in order, or false when
// they do not cover all of them.
func (eb *earlyBlob) parts(want frames.Span) ([]*earlyPiece, bool) {
	return frames.Cover(eb.pieces, func(p *earlyPiece) frames.Span { return p.Span }, want)
}

// await returns when the pieces holding bytes want are done, or ctx is.
func (eb *earlyBlob) await(ctx context.Context, want frames.Span) {
	parts, _ := eb.parts(want)
	for _, p := range parts {
		select {
		case <-p.done:
		case <-ctx.Done():
			return
		}
	}
}

// read returns bytes want of the blob if early pieces cover all of them,
// waiting for those pieces; ok is false when they do not, or one failed
// (the caller asks the registry).
func (eb *earlyBlob) read(ctx context.Context, want frames.Span) (b []byte, ok bool) {
	parts, ok := eb.parts(want)
	if !ok {
		return nil, false
	}
	off, end := want.Off, want.End()
	out := make([]byte, 0, want.Len)
	for _, p := range parts {
		select {
		case <-p.done:
		case <-ctx.Done():
			return nil, false
		}
		if p.err != nil || int64(len(p.b)) != p.Len {
			return nil, false
		}
		lo := max(off, p.Off) - p.Off
		hi := min(end, p.End()) - p.Off
		out = append(out, p.b[lo:hi]...)
	}
	return out, true
}

// earlyFor returns the early pieces of data blob d, if any.
func (s *Profiles) earlyFor(d digest.Digest) *earlyBlob {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.early[d]
}
