package expand

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/layerindex"
)

// maxPackBytes bounds the uncompressed bytes of a pack: the pages of a
// profile past it, in first-read order, are left out of the pack (a node
// reads them from the frames).
const maxPackBytes = 64 << 20

// packMu makes one pack at a time: a pack is compressed on every core.
var packMu sync.Mutex

// A packPage is one page range of a profile, with its layer and rank.
type packPage struct {
	layer   int
	off, n  int64
	rank, i int
}

// checkPages checks the pages profile p lists for layer l (index i of
// p.Layers), whose index is ix.
func checkPages(l *api.ProfileLayer, ix *layerindex.Index) error {
	if l.PageRanks != nil && len(l.PageRanks) != len(l.Pages) {
		return fmt.Errorf("%w: layer %s: %d page ranks for %d page ranges", ErrBadProfile, l.Layer, len(l.PageRanks), len(l.Pages))
	}
	for _, r := range l.Pages {
		if r[0] < 0 || r[1] <= 0 || r[0]+r[1] > ix.StreamSize || r[0]+r[1] < r[0] {
			return fmt.Errorf("%w: layer %s: page range %v outside the uncompressed stream", ErrBadProfile, l.Layer, r)
		}
	}
	return nil
}

// checkRanks checks that ranks, if any are given, number n items from 0,
// each once; what names the items.
func checkRanks(ranks []int, n int, what string) error {
	if len(ranks) == 0 {
		return nil
	}
	if len(ranks) != n {
		return fmt.Errorf("%w: %s ranks given for some layers only", ErrBadProfile, what)
	}
	ranks = slices.Clone(ranks)
	slices.Sort(ranks)
	for i, r := range ranks {
		if r != i {
			return fmt.Errorf("%w: %s ranks are not 0 to %d, each once", ErrBadProfile, what, n-1)
		}
	}
	return nil
}

// loadIndex reads and decodes the index of expansion md, linking its blobs
// into repo.
func (s *Service) loadIndex(ctx context.Context, repo string, md *api.MountDescriptor) (*layerindex.Index, error) {
	if err := s.st.Link(ctx, repo, md.Index.Digest); err != nil {
		return nil, err
	}
	f, err := s.st.OpenBlob(ctx, repo, md.Index.Digest)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, md.Index.Size+1))
	if err != nil {
		return nil, err
	}
	return layerindex.Decode(b)
}

// buildPack makes the pack of the pages profile p lists (api.Pack), from
// the expansions of its layers (indexes ixs, mount descriptors mds, by
// p.Layers), stores it as a blob of repo and returns its table; nil when p
// lists no pages.
func (s *Service) buildPack(ctx context.Context, repo string, p *api.Profile, ixs []*layerindex.Index, mds []*api.MountDescriptor) (*api.Pack, error) {
	var pages []packPage
	for li, l := range p.Layers {
		for i, r := range l.Pages {
			rank := i
			if l.PageRanks != nil {
				rank = l.PageRanks[i]
			}
			pages = append(pages, packPage{layer: li, off: r[0], n: r[1], rank: rank, i: len(pages)})
		}
	}
	if len(pages) == 0 {
		return nil, nil
	}
	slices.SortStableFunc(pages, func(a, b packPage) int { return cmp.Compare(a.rank, b.rank) })

	packMu.Lock()
	defer packMu.Unlock()
	readers := make([]*streamReader, len(p.Layers))
	defer func() {
		for _, r := range readers {
			if r != nil {
				r.data.Close()
			}
		}
	}()
	pack := &api.Pack{}
	var raw []byte
	for _, pg := range pages {
		if int64(len(raw)) >= maxPackBytes {
			break
		}
		n := min(pg.n, maxPackBytes-int64(len(raw)))
		r := readers[pg.layer]
		if r == nil {
			md := mds[pg.layer]
			if err := s.st.Link(ctx, repo, md.Data.Digest); err != nil {
				return nil, err
			}
			f, err := s.st.OpenBlob(ctx, repo, md.Data.Digest)
			if err != nil {
				return nil, err
			}
			r = &streamReader{ix: ixs[pg.layer], data: f, frames: map[int][]byte{}}
			readers[pg.layer] = r
		}
		var err error
		if raw, err = r.appendRange(raw, pg.off, n); err != nil {
			return nil, fmt.Errorf("pack: layer %s: %w", p.Layers[pg.layer].Layer, err)
		}
		if k := len(pack.Spans) - 1; k >= 0 && pack.Spans[k][0] == int64(pg.layer) && pack.Spans[k][1]+pack.Spans[k][2] == pg.off {
			pack.Spans[k][2] += n
		} else {
			pack.Spans = append(pack.Spans, [3]int64{int64(pg.layer), pg.off, n})
		}
	}

	// The chunks are compressed on every core, then written in order.
	nchunks := (len(raw) + api.PackChunkSize - 1) / api.PackChunkSize
	out := make([][]byte, nchunks)
	errs := make([]error, nchunks)
	next := make(chan int, nchunks)
	for i := range nchunks {
		next <- i
	}
	close(next)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), nchunks) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression),
				zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(api.PackChunkSize))
			if err != nil {
				for i := range next {
					errs[i] = err
				}
				return
			}
			defer enc.Close()
			for i := range next {
				if ctx.Err() != nil {
					errs[i] = ctx.Err()
					continue
				}
				chunk := raw[i*api.PackChunkSize : min((i+1)*api.PackChunkSize, len(raw))]
				out[i] = enc.EncodeAll(chunk, nil)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	tmp, err := s.st.CreateTemp("pack-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name()) // gone once committed
	h := sha256.New()
	w := io.MultiWriter(tmp, h)
	for i, b := range out {
		if _, err := w.Write(b); err != nil {
			tmp.Close()
			return nil, err
		}
		sum := sha256.Sum256(b)
		usize := min(api.PackChunkSize, len(raw)-i*api.PackChunkSize)
		pack.Chunks = append(pack.Chunks, api.PackChunk{
			Size: int64(len(b)), USize: int64(usize), Digest: digest.NewDigestFromBytes(digest.SHA256, sum[:]),
		})
		pack.Size += int64(len(b))
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	pack.Digest = digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
	if err := s.st.CommitFile(ctx, repo, tmp.Name(), pack.Digest); err != nil {
		return nil, err
	}
	return pack, nil
}

// A streamReader reads a layer's uncompressed stream from its expansion,
// verifying every frame it decodes.
type streamReader struct {
	ix     *layerindex.Index
	data   *os.File
	frames map[int][]byte // decoded, a few
}

// appendRange appends bytes [off, off+n) of the stream to dst.
func (r *streamReader) appendRange(dst []byte, off, n int64) ([]byte, error) {
	first, last := r.ix.FramesFor(off, n)
	if first > last {
		return nil, fmt.Errorf("range %d+%d outside the stream", off, n)
	}
	for k := first; k <= last; k++ {
		data, ok := r.frames[k]
		if !ok {
			fr := &r.ix.Frames[k]
			cb := make([]byte, fr.CSize)
			if _, err := r.data.ReadAt(cb, fr.COffset); err != nil {
				return nil, fmt.Errorf("frame %d: %w", k, err)
			}
			var err error
			if data, err = r.ix.DecodeFrame(k, cb); err != nil {
				return nil, err
			}
			if len(r.frames) >= 64 {
				clear(r.frames)
			}
			r.frames[k] = data
		}
		fr := &r.ix.Frames[k]
		lo := max(off-fr.UOffset, 0)
		hi := min(off+n-fr.UOffset, fr.USize)
		dst = append(dst, data[lo:hi]...)
	}
	return dst, nil
}
