package expand

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
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
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

// A packPage is one page range of a profile, with its layer and rank, and
// (i) where its bytes go in the pack's uncompressed content.
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

	// One pack at a time, for as long as the request waits.
	select {
	case s.packing <- struct{}{}:
		defer func() { <-s.packing }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}

	// The pages are laid out in first-read order (and cut at
	// api.MaxPackBytes), then read in stream order, each frame decoded
	// once however the pages are spread over it.
	pack := &api.Pack{}
	var size int64
	for k, pg := range pages {
		if size >= api.MaxPackBytes {
			pages = pages[:k]
			break
		}
		pages[k].n = min(pg.n, api.MaxPackBytes-size)
		pages[k].i = int(size) // where its bytes go
		size += pages[k].n
		pg = pages[k]
		if k := len(pack.Spans) - 1; k >= 0 && pack.Spans[k][0] == int64(pg.layer) && pack.Spans[k][1]+pack.Spans[k][2] == pg.off {
			pack.Spans[k][2] += pg.n
		} else {
			pack.Spans = append(pack.Spans, [3]int64{int64(pg.layer), pg.off, pg.n})
		}
	}
	raw := make([]byte, size)
	slices.SortFunc(pages, func(a, b packPage) int {
		return cmp.Or(cmp.Compare(a.layer, b.layer), cmp.Compare(a.off, b.off))
	})
	var r *streamReader
	defer func() {
		if r != nil {
			r.data.Close()
		}
	}()
	for _, pg := range pages {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if r == nil || r.layer != pg.layer {
			if r != nil {
				r.data.Close()
			}
			md := mds[pg.layer]
			if err := s.st.Link(ctx, repo, md.Data.Digest); err != nil {
				return nil, err
			}
			f, err := s.st.OpenBlob(ctx, repo, md.Data.Digest)
			if err != nil {
				return nil, err
			}
			r = &streamReader{ix: ixs[pg.layer], data: f, layer: pg.layer, frame: -1}
		}
		if err := r.readRange(raw[pg.i:pg.i+int(pg.n)], pg.off); err != nil {
			return nil, fmt.Errorf("pack: layer %s: %w", p.Layers[pg.layer].Layer, err)
		}
	}

	// The chunks are compressed on up to 4 cores, then written in order.
	nchunks := (len(raw) + api.PackChunkSize - 1) / api.PackChunkSize
	out := make([][]byte, nchunks)
	errs := make([]error, nchunks)
	next := make(chan int, nchunks)
	for i := range nchunks {
		next <- i
	}
	close(next)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), 4, nchunks) {
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
	// The profile is served whole, with its pack, or the pack is not made.
	stored := withPack(p, pack)
	if b, err := json.Marshal(stored); err != nil || len(b) > api.MaxProfileBytes {
		return nil, fmt.Errorf("the profile with its pack would be over %d bytes", api.MaxProfileBytes)
	}
	if err := s.st.CommitFile(ctx, repo, tmp.Name(), pack.Digest); err != nil {
		return nil, err
	}
	return pack, nil
}

// withPack returns profile p as stored with its pack: the pages it lists
// are in the pack's spans, so they are left out.
func withPack(p *api.Profile, pack *api.Pack) *api.Profile {
	q := *p
	q.Layers = slices.Clone(p.Layers)
	for i := range q.Layers {
		q.Layers[i].Pages, q.Layers[i].PageRanks = nil, nil
	}
	q.Pack = pack
	return &q
}

// A streamReader reads a layer's uncompressed stream from its expansion,
// verifying every frame it decodes; reads in stream order decode each
// frame once.
type streamReader struct {
	ix    *layerindex.Index
	data  store.Reader
	layer int
	frame int    // the frame decoded last, -1 none
	buf   []byte // its content
}

// readRange reads bytes [off, off+len(dst)) of the stream into dst.
func (r *streamReader) readRange(dst []byte, off int64) error {
	first, last := r.ix.FramesFor(off, int64(len(dst)))
	if first > last {
		return fmt.Errorf("range %d+%d outside the stream", off, len(dst))
	}
	n := 0
	for k := first; k <= last; k++ {
		fr := &r.ix.Frames[k]
		if r.frame != k {
			cb := make([]byte, fr.CSize)
			if _, err := r.data.ReadAt(cb, fr.COffset); err != nil {
				return fmt.Errorf("frame %d: %w", k, err)
			}
			data, err := r.ix.DecodeFrame(k, cb)
			if err != nil {
				return err
			}
			r.frame, r.buf = k, data
		}
		lo := max(off-fr.UOffset, 0)
		hi := min(off+int64(len(dst))-fr.UOffset, fr.USize)
		n += copy(dst[n:], r.buf[lo:hi])
	}
	return nil
}
