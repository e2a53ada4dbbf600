package layerfs

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/layerindex"
)

// A fetcher gets the uncompressed content of frames: from memory, from the
// node's cache, or from the source, verifying every frame before use.
//
// Each frame missing from memory has at most one flight at a time: the
// first reader that needs it starts one, later readers wait for it. A
// flight runs detached from the reader that started it, bounded by
// Options.FetchTimeout, so an interrupted reader does not fail the others.
// Flights started together fetch their missing frames with one ranged read
// per run of adjacent frames.
type fetcher struct {
	ix    *layerindex.Index
	src   Source
	cache *cache.Cache // nil: no disk cache
	opts  *Options
	log   *slog.Logger
	st    *counters

	mu       sync.Mutex
	mem      memLRU
	inflight map[int]*flight
	failed   map[int]failure
}

// failMemory is how long the failure of a frame's flight is the answer for
// that frame without trying again: the kernel retries a failed readahead
// at once, page by page, and each retry must not wait out
// Options.FetchTimeout again.
const failMemory = time.Second

type failure struct {
	at  time.Time
	err error
}

type flight struct {
	done chan struct{}
	data []byte
	err  error
}

func newFetcher(ix *layerindex.Index, src Source, c *cache.Cache, opts *Options, st *counters) *fetcher {
	return &fetcher{
		ix:       ix,
		src:      src,
		cache:    c,
		opts:     opts,
		log:      opts.Logger,
		st:       st,
		mem:      memLRU{max: opts.MemoryBytes, elems: make(map[int]*list.Element)},
		inflight: make(map[int]*flight),
		failed:   make(map[int]failure),
	}
}

// frames returns the content of frames first to last. It fails with ctx's
// error when ctx is done first, or with the error of a flight: the source
// kept failing, or a frame did not pass verification.
func (f *fetcher) frames(ctx context.Context, first, last int) ([][]byte, error) {
	out := make([][]byte, last-first+1)
	flights := make([]*flight, len(out))
	var mine []int
	f.mu.Lock()
	for k := first; k <= last; k++ {
		if fail, ok := f.failed[k]; ok {
			if time.Since(fail.at) < failMemory {
				f.mu.Unlock()
				return nil, fail.err
			}
			delete(f.failed, k)
		}
	}
	for k := first; k <= last; k++ {
		if b, ok := f.mem.get(k); ok {
			out[k-first] = b
			f.st.memoryHits.Add(1)
			continue
		}
		fl := f.inflight[k]
		if fl == nil {
			fl = &flight{done: make(chan struct{})}
			f.inflight[k] = fl
			mine = append(mine, k)
		}
		flights[k-first] = fl
	}
	f.mu.Unlock()
	if len(mine) > 0 {
		go f.fill(mine)
	}
	for i, fl := range flights {
		if fl == nil {
			continue
		}
		select {
		case <-fl.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if fl.err != nil {
			return nil, fl.err
		}
		out[i] = fl.data
	}
	return out, nil
}

// prefetch starts flights for the frames first to last that are not in
// memory, in flight or just failed, and does not wait for them.
func (f *fetcher) prefetch(first, last int) {
	last = min(last, len(f.ix.Frames)-1)
	var mine []int
	f.mu.Lock()
	for k := first; k <= last; k++ {
		if f.mem.has(k) || f.inflight[k] != nil {
			continue
		}
		if fail, ok := f.failed[k]; ok && time.Since(fail.at) < failMemory {
			continue
		}
		f.inflight[k] = &flight{done: make(chan struct{})}
		mine = append(mine, k)
	}
	f.mu.Unlock()
	if len(mine) > 0 {
		go f.fill(mine)
	}
}

// fill completes the flights of frames ks, in increasing order.
func (f *fetcher) fill(ks []int) {
	ctx, cancel := context.WithTimeout(context.Background(), f.opts.FetchTimeout)
	defer cancel()

	var need []int
	for _, k := range ks {
		if data, ok := f.fromCache(ctx, k); ok {
			f.finish(k, data, nil)
			continue
		}
		need = append(need, k)
	}
	for _, run := range runs(f.ix.Frames, need, f.opts.MaxFetchBytes) {
		f.fetchRun(ctx, run)
	}
}

// runs groups the frames ks, in increasing order, into the runs that are
// read with one request each: adjacent frames, at most maxBytes of them
// (but at least one frame).
func runs(frames []layerindex.Frame, ks []int, maxBytes int64) [][]int {
	var out [][]int
	for len(ks) > 0 {
		n := 1
		size := frames[ks[0]].CSize
		for n < len(ks) && ks[n] == ks[n-1]+1 && size+frames[ks[n]].CSize <= maxBytes {
			size += frames[ks[n]].CSize
			n++
		}
		out = append(out, ks[:n:n])
		ks = ks[n:]
	}
	return out
}

func (f *fetcher) fromCache(ctx context.Context, k int) ([]byte, bool) {
	if f.cache == nil {
		return nil, false
	}
	fr := &f.ix.Frames[k]
	cb, err := f.cache.Frame(ctx, fr.Digest)
	if err != nil {
		if !errors.Is(err, cache.ErrNotFound) {
			f.log.Warn("layerfs: reading frame from cache", "frame", k, "err", err)
		}
		return nil, false
	}
	data, err := f.ix.DecodeFrame(k, cb)
	if err != nil {
		// The cache verified the digest, so this frame is not what the
		// index says it is: fetch it again and let verification decide.
		f.log.Warn("layerfs: cached frame does not decode", "frame", k, "err", err)
		return nil, false
	}
	f.st.cacheHits.Add(1)
	return data, true
}

// fetchRun reads the adjacent frames run from the source with one request,
// verifies each, and refetches once, alone, a frame that fails.
func (f *fetcher) fetchRun(ctx context.Context, run []int) {
	first, last := &f.ix.Frames[run[0]], &f.ix.Frames[run[len(run)-1]]
	off, end := first.COffset, last.COffset+last.CSize
	b, err := f.readRange(ctx, off, end-off)
	if err != nil {
		for _, k := range run {
			f.finish(k, nil, err)
		}
		return
	}
	for _, k := range run {
		fr := &f.ix.Frames[k]
		cb := b[fr.COffset-off : fr.COffset-off+fr.CSize]
		data, err := f.ix.DecodeFrame(k, cb)
		if err != nil {
			f.st.corruptFrames.Add(1)
			f.log.Warn("layerfs: frame failed verification, refetching", "frame", k, "err", err)
			cb, err = f.readRange(ctx, fr.COffset, fr.CSize)
			if err == nil {
				data, err = f.ix.DecodeFrame(k, cb)
				if err != nil {
					f.st.corruptFrames.Add(1)
					f.log.Error("layerfs: frame failed verification twice", "frame", k, "err", err)
				}
			}
			if err != nil {
				f.finish(k, nil, fmt.Errorf("frame %d: %w", k, err))
				continue
			}
		}
		f.st.fetchedFrames.Add(1)
		if f.cache != nil {
			if err := f.cache.PutFrame(ctx, fr.Digest, cb); err != nil {
				f.log.Debug("layerfs: frame not cached", "frame", k, "err", err)
			}
		}
		f.finish(k, data, nil)
	}
}

func (f *fetcher) finish(k int, data []byte, err error) {
	f.mu.Lock()
	fl := f.inflight[k]
	delete(f.inflight, k)
	if err == nil {
		f.mem.add(k, data)
		delete(f.failed, k)
	} else {
		f.failed[k] = failure{time.Now(), err}
	}
	f.mu.Unlock()
	fl.data, fl.err = data, err
	close(fl.done)
}

// readRange reads bytes [off, off+n) of the data blob, retrying failed
// attempts with a growing pause until Options.Attempts attempts failed or
// ctx is done.
func (f *fetcher) readRange(ctx context.Context, off, n int64) ([]byte, error) {
	pause := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		b, err := f.attempt(ctx, off, n)
		if err == nil {
			f.st.requests.Add(1)
			f.st.fetchedBytes.Add(n)
			return b, nil
		}
		f.st.sourceErrors.Add(1)
		if attempt >= f.opts.Attempts || ctx.Err() != nil {
			return nil, fmt.Errorf("read data blob bytes %d-%d: %d attempts: %w", off, off+n-1, attempt, err)
		}
		f.log.Warn("layerfs: reading data blob failed, retrying", "offset", off, "length", n, "attempt", attempt, "err", err)
		t := time.NewTimer(pause)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("read data blob bytes %d-%d: %d attempts: %w", off, off+n-1, attempt, err)
		}
		pause = min(2*pause, time.Second)
	}
}

// attempt makes one request, bounded by Options.AttemptTimeout even when
// the source does not honour its context: a request that overstays is
// abandoned.
func (f *fetcher) attempt(ctx context.Context, off, n int64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, f.opts.AttemptTimeout)
	defer cancel()
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := f.src.ReadAt(ctx, off, n)
		ch <- result{b, err}
	}()
	select {
	case r := <-ch:
		if r.err == nil && int64(len(r.b)) != n {
			r.err = fmt.Errorf("source returned %d bytes, want %d", len(r.b), n)
		}
		return r.b, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// memLRU keeps decompressed frames, bounded in bytes; it always keeps the
// most recent frame. It is guarded by fetcher.mu.
type memLRU struct {
	max   int64
	size  int64
	lru   list.List // of *memFrame, front most recent
	elems map[int]*list.Element
}

type memFrame struct {
	k    int
	data []byte
}

func (m *memLRU) get(k int) ([]byte, bool) {
	e := m.elems[k]
	if e == nil {
		return nil, false
	}
	m.lru.MoveToFront(e)
	return e.Value.(*memFrame).data, true
}

func (m *memLRU) has(k int) bool { return m.elems[k] != nil }

func (m *memLRU) add(k int, data []byte) {
	if m.elems[k] != nil || m.max <= 0 {
		return
	}
	m.elems[k] = m.lru.PushFront(&memFrame{k, data})
	m.size += int64(len(data))
	for m.size > m.max && m.lru.Len() > 1 {
		old := m.lru.Remove(m.lru.Back()).(*memFrame)
		delete(m.elems, old.k)
		m.size -= int64(len(old.data))
	}
}
