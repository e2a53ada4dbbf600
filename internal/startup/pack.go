package startup

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/internal/remote"
)

// A packLayer is what a start-up pack (api.Pack) holds of one layer's
// uncompressed stream: spans, each at a place in the pack's uncompressed
// content, whose chunks are fetched in the order the start reads them.
// The layer's reads take their bytes from here (source.ReadPages)
// instead of fetching the frames that hold them.
type packLayer struct {
	spans  []packSpan // by offset, not overlapping
	chunks []*packChunk
}

// A packSpan is a span of the layer's stream and where its bytes are in
// the pack's uncompressed content.
type packSpan struct {
	frames.Span
	at int64
}

// A packChunk is one chunk of a pack: its compressed bytes arrive in
// piece; they are verified against digest and decompressed when first
// needed.
type packChunk struct {
	piece  *earlyPiece
	at     int64 // in the pack's uncompressed content
	usize  int64
	digest digest.Digest

	once sync.Once
	data []byte
	err  error
}

// packDecoder decompresses pack chunks; each is at most api.PackChunkSize.
var packDecoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(4*api.PackChunkSize))

// get returns the chunk's content, waiting for it until ctx is done.
func (c *packChunk) get(ctx context.Context) ([]byte, error) {
	select {
	case <-c.piece.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c.once.Do(func() {
		if c.piece.err != nil {
			c.err = c.piece.err
			return
		}
		sum := sha256.Sum256(c.piece.b)
		if digest.NewDigestFromBytes(digest.SHA256, sum[:]) != c.digest {
			c.err = fmt.Errorf("pack chunk %s: digest mismatch", c.digest)
			return
		}
		b, err := packDecoder.DecodeAll(c.piece.b, make([]byte, 0, c.usize))
		if err == nil && int64(len(b)) != c.usize {
			err = fmt.Errorf("%d bytes, want %d", len(b), c.usize)
		}
		if err != nil {
			c.err = fmt.Errorf("pack chunk %s: %w", c.digest, err)
			return
		}
		c.data = b
	})
	return c.data, c.err
}

// failed reports whether the chunk is known to be unusable.
func (c *packChunk) failed() bool {
	select {
	case <-c.piece.done:
		return c.piece.err != nil
	default:
		return false
	}
}

// parts returns the spans that cover bytes want, in order, or false when
// they do not cover all of them.
func (pl *packLayer) parts(want frames.Span) ([]packSpan, bool) {
	return frames.Cover(pl.spans, func(s packSpan) frames.Span { return s.Span }, want)
}

// chunksFor calls fn for each chunk holding bytes [at, at+n) of the pack's
// uncompressed content, with the part of the chunk's content that is and
// where it goes; it stops at the first error fn returns.
func (pl *packLayer) chunksFor(at, n int64, fn func(c *packChunk, lo, hi, dst int64) error) error {
	i, found := slices.BinarySearchFunc(pl.chunks, at, func(c *packChunk, at int64) int { return cmp.Compare(c.at, at) })
	if !found {
		i--
	}
	for end := at + n; at < end; i++ {
		if i < 0 || i >= len(pl.chunks) {
			return errors.New("pack span outside its chunks")
		}
		c := pl.chunks[i]
		lo, hi := at-c.at, min(end-c.at, c.usize)
		if lo < 0 || lo >= hi {
			return errors.New("pack span outside its chunks")
		}
		if err := fn(c, lo, hi, at); err != nil {
			return err
		}
		at = c.at + hi
	}
	return nil
}

// walk calls fn for each part of a chunk that holds bytes want of the
// stream, in order, with the part of the chunk's content [clo, chi) and
// where it goes, relative to want.Off; it returns false when the pack
// does not hold all of them or fn fails.
func (pl *packLayer) walk(want frames.Span, fn func(c *packChunk, clo, chi, to int64) error) bool {
	parts, ok := pl.parts(want)
	if !ok {
		return false
	}
	off := want.Off
	for _, s := range parts {
		lo := max(off, s.Off)
		hi := min(want.End(), s.End())
		base := s.at + lo - s.Off // pack position of stream offset lo
		err := pl.chunksFor(base, hi-lo, func(c *packChunk, clo, chi, at int64) error {
			return fn(c, clo, chi, lo-off+at-base)
		})
		if err != nil {
			return false
		}
	}
	return true
}

// covers reports whether the pack holds bytes want of the stream, in
// chunks that have not failed (they may be on their way).
func (pl *packLayer) covers(want frames.Span) bool {
	return pl.walk(want, func(c *packChunk, _, _, _ int64) error {
		if c.failed() {
			return errors.New("failed")
		}
		return nil
	})
}

// read fills dest with bytes [off, off+len(dest)) of the stream if the
// pack holds them, waiting for their chunks until ctx is done.
func (pl *packLayer) read(ctx context.Context, dest []byte, off int64) bool {
	return pl.walk(frames.Span{Off: off, Len: int64(len(dest))}, func(c *packChunk, clo, chi, to int64) error {
		data, err := c.get(ctx)
		if err != nil {
			return err
		}
		copy(dest[to:], data[clo:chi])
		return nil
	})
}

// checkPack checks the table of pack k against profile p: at most
// api.MaxPackBytes in chunks of at most api.PackChunkSize (compressed, not
// much more), that add up to the blob, and spans of p's layers that add up
// to the chunks.
func checkPack(p *api.Profile, k *api.Pack) error {
	if k.Digest.Validate() != nil || len(k.Chunks) == 0 {
		return errors.New("no blob or no chunks")
	}
	if len(k.Chunks) > api.MaxPackBytes/api.PackChunkSize+1 || len(k.Spans) > api.MaxPackBytes {
		return fmt.Errorf("%d chunks, %d spans: too many", len(k.Chunks), len(k.Spans))
	}
	var size, usize, spans int64
	for _, c := range k.Chunks {
		if c.Size <= 0 || c.Size > 2*api.PackChunkSize || c.USize <= 0 || c.USize > api.PackChunkSize || c.Digest.Validate() != nil {
			return fmt.Errorf("bad chunk %+v", c)
		}
		size += c.Size
		usize += c.USize
	}
	for _, s := range k.Spans {
		if s[0] < 0 || s[0] >= int64(len(p.Layers)) || s[1] < 0 || s[2] <= 0 || s[2] > api.MaxPackBytes || s[1] > math.MaxInt64-s[2] {
			return fmt.Errorf("bad span %v", s)
		}
		if spans += s[2]; spans > api.MaxPackBytes {
			return fmt.Errorf("spans of more than %d bytes", api.MaxPackBytes)
		}
	}
	if size != k.Size || usize != spans {
		return fmt.Errorf("chunks of %d bytes (%d uncompressed) for a blob of %d and spans of %d", size, usize, k.Size, spans)
	}
	return nil
}

// StartPack starts fetching the start-up pack of profile p, if it has a
// valid one that is not being fetched already, for the layers of the image
// (layers), from repo, and keeps it for earlyKeep; beyond a head, the
// requests wait for indexes to be closed. Chunks in the node's cache are
// taken from there. It reports whether the pack holds pages of the image's
// layers, to be used instead of the profile's frames.
//
// A pack is used only for the layers mounted from the repository it came
// from (source.ReadPages): a registry vouches for the packs it makes
// as for the indexes it serves, and for no other registry's layers.
func (s *Profiles) StartPack(repo remote.Repository, p *api.Profile, layers []ocispec.Descriptor, indexes <-chan struct{}) bool {
	k := p.Pack
	if k == nil {
		return false
	}
	if err := checkPack(p, k); err != nil {
		s.log.Info("start-up pack not used", "pack", k.Digest, "err", err)
		return false
	}
	key := packKey{repo, k.Digest}
	s.packsMu.RLock()
	busy := s.packing[key]
	s.packsMu.RUnlock()
	if busy {
		return true
	}
	chunks := make([]*packChunk, len(k.Chunks))
	var off, at int64
	for i, c := range k.Chunks {
		chunks[i] = &packChunk{piece: &earlyPiece{Span: frames.Span{Off: off, Len: c.Size}, done: make(chan struct{})}, at: at, usize: c.USize, digest: c.Digest}
		off += c.Size
		at += c.USize
	}
	byData := packLayers(p, chunks, layers)
	if len(byData) == 0 {
		return false
	}
	// The chunks are held as fetched, and their pages once decompressed.
	size := k.Size
	for _, c := range k.Chunks {
		size += c.USize
	}
	if !s.reserve(size) {
		s.log.Info("start-up pack not used: over the memory budget", "pack", k.Digest, "bytes", size, "held", s.held.Load(), "max", s.opts.EarlyMax)
		return false
	}
	s.packsMu.Lock()
	if s.packing[key] {
		s.packsMu.Unlock()
		s.held.Add(-size)
		return true
	}
	s.packing[key] = true
	for d, pl := range byData {
		s.packs[packKey{repo, d}] = pl
	}
	s.packsMu.Unlock()
	time.AfterFunc(earlyKeep, func() {
		s.held.Add(-size)
		s.packsMu.Lock()
		defer s.packsMu.Unlock()
		delete(s.packing, key)
		for d, pl := range byData {
			if s.packs[packKey{repo, d}] == pl {
				delete(s.packs, packKey{repo, d})
			}
		}
	})

	var items []earlyItem
	for i, c := range chunks {
		if s.cache != nil {
			if b, err := s.cache.Frame(context.Background(), c.digest); err == nil {
				c.piece.finish(b, nil)
				continue
			}
		}
		items = append(items, earlyItem{k.Digest, c.piece, i})
	}
	s.log.Debug("start-up pack", "pack", k.Digest, "bytes", k.Size, "chunks", len(k.Chunks), "to fetch", len(items))
	if len(items) == 0 {
		return true
	}
	s.fetchChunks(repo, cutChunks(items), indexes)
	// Chunks that arrive and match their digests go into the cache: a later
	// start on the node needs none of them again. When one does not, the
	// pack is dropped and the layers prefetch the profile's frames.
	go func() {
		for _, it := range items {
			c := chunks[it.rank]
			<-c.piece.done
			err := c.piece.err
			if err == nil {
				s.packBytes.Add(int64(len(c.piece.b)))
				sum := sha256.Sum256(c.piece.b)
				if digest.NewDigestFromBytes(digest.SHA256, sum[:]) != c.digest {
					err = errors.New("digest mismatch")
				}
			}
			if err != nil {
				s.log.Warn("start-up pack failed; fetching the profile's frames", "pack", k.Digest, "chunk", it.rank, "err", err)
				s.dropPack(repo, p, byData)
				return
			}
			if s.cache != nil {
				s.cache.PutFrame(context.Background(), c.digest, c.piece.b)
			}
		}
	}()
	return true
}

// dropPack stops using the pack of profile p that holds byData of the
// layers of repo, and prefetches the profile's frames of those layers that
// are mounted from repo (Options.Prefetch; a layer mounted later prefetches
// them as it mounts, Frames).
func (s *Profiles) dropPack(repo remote.Repository, p *api.Profile, byData map[digest.Digest]*packLayer) {
	s.packsMu.Lock()
	for d, pl := range byData {
		if s.packs[packKey{repo, d}] == pl {
			delete(s.packs, packKey{repo, d})
		}
	}
	s.packsMu.Unlock()
	if s.opts.Prefetch == nil {
		return
	}
	for _, pl := range p.Layers {
		if byData[pl.Data] != nil {
			s.opts.Prefetch(repo, pl.Layer, pl.Data, pl.Frames)
		}
	}
}

// A packKey names a pack, or a layer's data blob, in a repository.
type packKey struct {
	repo remote.Repository
	d    digest.Digest
}

// packLayers returns what the pack of profile p, whose chunks are chunks,
// holds of each layer of layers, by the layer's data blob.
func packLayers(p *api.Profile, chunks []*packChunk, layers []ocispec.Descriptor) map[digest.Digest]*packLayer {
	byData := map[digest.Digest]*packLayer{}
	var at int64
	for _, s := range p.Pack.Spans {
		pl := p.Layers[s[0]]
		if slices.ContainsFunc(layers, func(d ocispec.Descriptor) bool { return d.Digest == pl.Layer }) {
			if byData[pl.Data] == nil {
				byData[pl.Data] = &packLayer{chunks: chunks}
			}
			byData[pl.Data].spans = append(byData[pl.Data].spans, packSpan{Span: frames.Span{Off: s[1], Len: s[2]}, at: at})
		}
		at += s[2]
	}
	for _, pl := range byData {
		slices.SortFunc(pl.spans, func(a, b packSpan) int { return cmp.Compare(a.Off, b.Off) })
		// Spans that overlap are not from a real pack: only the first
		// is kept.
		kept := pl.spans[:0]
		for _, s := range pl.spans {
			if n := len(kept); n > 0 && kept[n-1].End() > s.Off {
				continue
			}
			kept = append(kept, s)
		}
		pl.spans = kept
	}
	return byData
}

// packFor returns what the start-up pack in use holds of data blob d of
// repo, if any.
func (s *Profiles) packFor(repo remote.Repository, d digest.Digest) *packLayer {
	s.packsMu.RLock()
	defer s.packsMu.RUnlock()
	return s.packs[packKey{repo, d}]
}
