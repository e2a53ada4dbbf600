package layerfs

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/frames"
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
// per run of adjacent frames. What to fetch together and in which order is
// computed by package frames (MissWindow, Runs, Bridge, ByRank), and each
// read is made by a frames.Reader (bounded attempts, each bounded in time);
// the fetcher holds the flights, the memory of frames and of failures, and
// the cache.
type fetcher struct {
	ix     *layerindex.Index
	src    Source
	reader *frames.Reader // of src, with its retries
	cache  *cache.Cache   // nil: no disk cache
	opts   *Options
	log    *slog.Logger
	st     *counters

	mu       sync.Mutex
	mem      memLRU
	inflight map[int]*flight
	failed   map[int]failure
	rec      *recording  // nil: not recording
	recOn    atomic.Bool // rec != nil, read without mu
	holding  bool        // the recording holds back opts.Completer
	walk     walk        // a walk of the layer in its order (streamAhead)

	// base is the context of every flight; close cancels it and waits for
	// the flights (fills) to end.
	base   context.Context
	cancel context.CancelFunc
	fills  sync.WaitGroup
	closed bool
}

// A walk is the state of the detection of a read of the layer in its
// order (a tar, a copy, a find reading every file: files sit in the data
// stream in the order of the layer's tar, a directory's files together).
// Misses in consecutive miss windows make a streak; a streak of
// walkStreak windows streams the windows after the last one read,
// walkAhead of them at a time, each its own request, so the link stays
// busy instead of idle for a round trip per window; reads in the
// streamed windows keep the stream ahead of them.
type walk struct {
	last   int64 // window index of the last miss (-2: none yet)
	streak int   // consecutive windows missed in order
	ahead  int64 // window index up to which flights are started
}

const (
	walkStreak = 3
	walkAhead  = 8
)

// A recording lists the frames read, in the order first read, each with
// its place in readSeq; and the bytes of the uncompressed stream read, as
// ranges in the order first read, each with its place.
type recording struct {
	seen  map[int]bool
	order []int
	seq   []uint64

	read    frames.Set
	pages   [][2]int64
	pageSeq []uint64
}

// A Recording is what StopRecording returns: the frames read, in the order
// first read, and the bytes of the uncompressed stream read (ranges
// [offset, length]; the kernel reads whole pages of a file), in the order
// first read, each with its place (Seq, PageSeq) in an order of first
// reads common to every FS of the process.
type Recording struct {
	Frames  []int
	Seq     []uint64
	Pages   [][2]int64
	PageSeq []uint64
}

// readSeq orders the first reads of frames across the recordings of every
// FS of the process, so that the recordings of an image's layers can be
// merged into one order.
var readSeq atomic.Uint64

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
	base, cancel := context.WithCancel(context.Background())
	log := opts.Logger
	reader := &frames.Reader{Source: src, Attempts: opts.Attempts, AttemptTimeout: opts.AttemptTimeout,
		OnFail: func(s frames.Span, attempt int, err error, again bool) {
			st.sourceErrors.Add(1)
			if again {
				log.Warn("layerfs: reading data blob failed, retrying", "offset", s.Off, "length", s.Len, "attempt", attempt, "err", err)
			}
		}}
	return &fetcher{
		reader:   reader,
		base:     base,
		cancel:   cancel,
		ix:       ix,
		src:      src,
		cache:    c,
		opts:     opts,
		log:      opts.Logger,
		st:       st,
		mem:      memLRU{max: opts.MemoryBytes, elems: make(map[int]*list.Element)},
		inflight: make(map[int]*flight),
		failed:   make(map[int]failure),
		walk:     walk{last: -2, ahead: -1},
	}
}

// frames returns the content of frames first to last. It fails with ctx's
// error when ctx is done first, or with the error of a flight: the source
// kept failing, or a frame did not pass verification. A call that waited
// for frames that were not on the node is reported to Options.ReadMiss.
func (f *fetcher) frames(ctx context.Context, first, last int) ([][]byte, error) {
	start := time.Now()
	out := make([][]byte, last-first+1)
	flights := make([]*flight, len(out))
	var mine []int
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil, errClosed
	}
	for k := first; k <= last; k++ {
		if fail, ok := f.failed[k]; ok {
			if time.Since(fail.at) < failMemory {
				f.mu.Unlock()
				return nil, fail.err
			}
			delete(f.failed, k)
		}
	}
	f.noteFrames(first, last)
	miss := false // a frame neither in memory nor in the cache
	for k := first; k <= last; k++ {
		if b, ok := f.mem.get(k); ok {
			out[k-first] = b
			f.st.memoryHits.Add(1)
			continue
		}
		if !miss && f.opts.ReadMiss != nil {
			miss = !f.cached(k)
		}
		fl := f.inflight[k]
		if fl == nil {
			fl = &flight{done: make(chan struct{})}
			f.inflight[k] = fl
			mine = append(mine, k)
		}
		flights[k-first] = fl
	}
	if len(mine) > 0 {
		mine = f.widen(mine)
	}
	ahead := f.streamAhead(first, last, len(mine) > 0)
	f.mu.Unlock()
	if len(mine) > 0 {
		f.startFill(mine)
	}
	for _, ks := range ahead {
		f.startFill(ks)
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
	if miss {
		f.opts.ReadMiss(time.Since(start))
	}
	return out, nil
}

// widen adds to the frames ks, which start new flights, the frames of the
// same miss windows (Options.MissWindow) that are not in memory, in flight
// or just failed, and starts flights for those too. f.mu is held.
func (f *fetcher) widen(ks []int) []int {
	w := f.opts.MissWindow
	if w <= 0 || !slices.ContainsFunc(ks, func(k int) bool { return !f.cached(k) }) {
		return ks // reads of cached frames are not widened
	}
	fs := f.ix.Frames
	win := frames.MissWindow(fs, ks[0], ks[len(ks)-1], w)
	lo := win.Off
	first, last := f.ix.FramesFor(win.Off, win.Len)
	if first > last {
		return ks
	}
	out := make([]int, 0, last-first+1)
	for k := first; k <= last; k++ {
		if k >= ks[0] && k <= ks[len(ks)-1] {
			if slices.Contains(ks, k) {
				out = append(out, k)
			}
			continue
		}
		if fs[k].UOffset < lo || f.mem.has(k) || f.inflight[k] != nil || f.cached(k) {
			continue
		}
		if fail, ok := f.failed[k]; ok && time.Since(fail.at) < failMemory {
			continue
		}
		f.inflight[k] = &flight{done: make(chan struct{})}
		out = append(out, k)
	}
	return out
}

// streamAhead notes a read of frames first to last (missed: it started
// flights) in the walk detection, and returns the flights to start for
// the windows a walk in progress should have fetched ahead of it (see
// walk), one list of frames per window. f.mu is held.
func (f *fetcher) streamAhead(first, last int, missed bool) [][]int {
	w := f.opts.MissWindow
	if w <= 0 || len(f.ix.Frames) == 0 {
		return nil
	}
	fs := f.ix.Frames
	lo, hi := fs[first].UOffset/w, fs[last].UOffset/w
	wk := &f.walk
	if missed {
		switch {
		case hi <= wk.last && lo >= wk.last-1:
			// The window missed last, or the one before: no news.
		case lo <= wk.last+1 && hi > wk.last:
			wk.streak += int(hi - wk.last) // the next window(s) in order
		case wk.streak >= walkStreak && lo > wk.last && lo <= wk.ahead+1:
			// Past the last read but within the stream (a frame it
			// failed, or that was evicted): the walk goes on.
		default: // elsewhere: no walk (or a new one)
			wk.streak, wk.ahead, wk.last = 1, -1, hi
		}
		wk.last = max(wk.last, hi)
	} else {
		if wk.streak < walkStreak {
			return nil
		}
		wk.last = max(wk.last, hi)
		if hi < wk.ahead-walkAhead/2 {
			return nil // far enough ahead still
		}
	}
	if wk.streak < walkStreak {
		return nil
	}
	end := fs[len(fs)-1].UOffset / w
	var out [][]int
	for win := max(wk.ahead+1, hi+1); win <= min(hi+walkAhead, end); win++ {
		a, b := f.ix.FramesFor(win*w, w)
		var ks []int
		for k := a; k >= 0 && k <= b; k++ {
			if fs[k].UOffset < win*w || f.mem.has(k) || f.inflight[k] != nil || f.cached(k) {
				continue
			}
			if fail, ok := f.failed[k]; ok && time.Since(fail.at) < failMemory {
				continue
			}
			f.inflight[k] = &flight{done: make(chan struct{})}
			ks = append(ks, k)
		}
		if len(ks) > 0 {
			out = append(out, ks)
			f.st.streamed.Add(int64(len(ks)))
		}
		wk.ahead = win
	}
	return out
}

// local reports whether frames first to last are all in memory, in the
// cache or in flight.
func (f *fetcher) local(first, last int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for k := first; k <= last; k++ {
		if !f.mem.has(k) && f.inflight[k] == nil && !f.cached(k) {
			return false
		}
	}
	return true
}

func (f *fetcher) cached(k int) bool {
	return f.cache != nil && f.cache.ContainsFrame(f.ix.Frames[k].Digest)
}

// prefetchList starts flights for the frames ks, given in the order they
// are wanted (first wanted first; repeats and frames out of range are
// ignored), that are not in memory, in the cache, in flight or just
// failed, and does not wait for them. Wanted frames separated by a gap of
// at most Options.PrefetchGap compressed bytes of missing frames are
// fetched together with the gap (a request costs a round trip, which on a
// slow link is worth more bytes than that); the runs, cut into requests of
// at most prefetchPiece bytes, go out over Options.PrefetchStreams
// concurrent requests, those holding the first-wanted frames first.
func (f *fetcher) prefetchList(ks []int) {
	rank := make(map[int]int, len(ks))
	var want, solo []int
	// Frames whose bytes are on their way to the source already are read
	// one by one, each as soon as it is there, not joined into runs.
	pending := map[int]bool{}
	ps, _ := f.src.(PendingSource)
	if ps != nil {
		for _, k := range ks {
			if k >= 0 && k < len(f.ix.Frames) && ps.Pending(f.ix.Frames[k].COffset, f.ix.Frames[k].CSize) {
				pending[k] = true
			}
		}
	}
	f.mu.Lock()
	missing := func(k int) bool {
		if f.mem.has(k) || f.inflight[k] != nil || f.cached(k) {
			return false
		}
		fail, ok := f.failed[k]
		return !ok || time.Since(fail.at) >= failMemory
	}
	for _, k := range ks {
		if _, seen := rank[k]; seen || k < 0 || k >= len(f.ix.Frames) {
			continue
		}
		rank[k] = len(rank)
		switch {
		case !missing(k):
		case pending[k]:
			solo = append(solo, k)
		default:
			want = append(want, k)
		}
	}
	slices.Sort(want)
	mine, taken := frames.Bridge(f.ix.Frames, want, f.opts.PrefetchGap, missing)
	for g, k := range taken {
		rank[g] = rank[k]
	}
	for _, k := range mine {
		f.inflight[k] = &flight{done: make(chan struct{})}
	}
	for _, k := range solo {
		f.inflight[k] = &flight{done: make(chan struct{})}
	}
	closed := f.closed
	if !closed {
		f.fills.Add(1 + len(solo))
	}
	f.mu.Unlock()
	for _, k := range solo {
		if closed {
			f.finish(k, nil, errClosed)
			continue
		}
		go func() {
			defer f.fills.Done()
			fr := &f.ix.Frames[k]
			ps.Await(f.base, fr.COffset, fr.CSize)
			f.fill([]int{k})
		}()
	}
	if len(mine) == 0 {
		if !closed {
			f.fills.Done()
		}
		return
	}
	if closed {
		for _, k := range mine {
			f.finish(k, nil, errClosed)
		}
		return
	}
	pieces := frames.Runs(f.ix.Frames, mine, prefetchPiece)
	frames.ByRank(pieces, rank)
	queue := make(chan []int, len(pieces))
	for _, p := range pieces {
		queue <- p
	}
	close(queue)
	workers := min(f.opts.PrefetchStreams, len(pieces))
	var wg sync.WaitGroup
	wg.Add(workers)
	for range workers {
		go func() {
			defer wg.Done()
			for p := range queue {
				f.fill(p)
			}
		}()
	}
	go func() { wg.Wait(); f.fills.Done() }()
}

// prefetchPiece bounds the compressed bytes of one prefetch request, so a
// long run is spread over the concurrent requests.
const prefetchPiece = 1 << 20

// startRecording starts listing the frames read; stopRecording ends it and
// returns them in the order first read, with their places in readSeq.
// A recording holds back the Options.Completer: a file completed into the
// cache would be read with passthrough, unseen.
func (f *fetcher) startRecording() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.rec != nil || f.closed {
		return
	}
	f.rec = &recording{seen: make(map[int]bool)}
	f.recOn.Store(true)
	f.holdCompleter(true)
}

func (f *fetcher) stopRecording() Recording {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.holdCompleter(false)
	if f.rec == nil {
		return Recording{}
	}
	r := f.rec
	f.rec = nil
	f.recOn.Store(false)
	return Recording{Frames: r.order, Seq: r.seq, Pages: r.pages, PageSeq: r.pageSeq}
}

// holdCompleter holds Options.Completer back, or lets it go on, once for
// this fetcher. f.mu is held.
func (f *fetcher) holdCompleter(hold bool) {
	c := f.opts.Completer
	if c == nil || f.holding == hold {
		return
	}
	f.holding = hold
	if hold {
		c.recording.Add(1)
	} else {
		c.recording.Add(-1)
	}
}

// noteFrames records a read of frames first to last. f.mu is held.
func (f *fetcher) noteFrames(first, last int) {
	r := f.rec
	if r == nil {
		return
	}
	for k := first; k <= last; k++ {
		if !r.seen[k] {
			r.seen[k] = true
			r.order = append(r.order, k)
			r.seq = append(r.seq, readSeq.Add(1))
		}
	}
}

// notePages records a read of bytes [off, off+n) of the uncompressed
// stream: the parts of it not read before, as ranges; a range that
// continues the one recorded last extends it.
func (f *fetcher) notePages(off, n int64) {
	if !f.recOn.Load() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.rec
	if r == nil || n <= 0 {
		return
	}
	for _, g := range r.read.Add(frames.Span{Off: off, Len: n}) {
		if k := len(r.pages) - 1; k >= 0 && r.pages[k][0]+r.pages[k][1] == g.Off {
			r.pages[k][1] += g.Len
			continue
		}
		r.pages = append(r.pages, [2]int64{g.Off, g.Len})
		r.pageSeq = append(r.pageSeq, readSeq.Add(1))
	}
}

// recording reports whether reads are being recorded.
func (f *fetcher) recording() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rec != nil
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
		f.startFill(mine)
	}
}

var errClosed = errors.New("layer file system closed")

// startFill runs fill(ks) in the background, or fails the flights of ks at
// once when the fetcher is closed.
func (f *fetcher) startFill(ks []int) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		for _, k := range ks {
			f.finish(k, nil, errClosed)
		}
		return
	}
	f.fills.Add(1)
	f.mu.Unlock()
	go func() {
		defer f.fills.Done()
		f.fill(ks)
	}()
}

// close cancels the flights and waits for them to end; later reads fail.
func (f *fetcher) close() {
	f.mu.Lock()
	f.closed = true
	f.holdCompleter(false)
	f.mu.Unlock()
	f.cancel()
	f.fills.Wait()
}

// fill completes the flights of frames ks, in increasing order.
func (f *fetcher) fill(ks []int) {
	ctx, cancel := context.WithTimeout(f.base, f.opts.FetchTimeout)
	defer cancel()

	var need []int
	for _, k := range ks {
		if data, ok := f.fromCache(ctx, k); ok {
			f.finish(k, data, nil)
			continue
		}
		need = append(need, k)
	}
	for _, run := range frames.Runs(f.ix.Frames, need, f.opts.MaxFetchBytes) {
		f.fetchRun(ctx, run)
	}
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
	// The cache returned bytes it checked against fr.Digest, the index's
	// digest of the frame: no need to hash them again.
	data, err := f.ix.DecodeVerifiedFrame(k, cb)
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
		f.finish(k, data, nil) // readers go on while the frame is cached
		if f.cache != nil {
			// Fetched and verified: cached even when Close is cancelling
			// the fetches.
			if err := f.cache.PutFrame(context.WithoutCancel(ctx), fr.Digest, cb); err != nil {
				f.log.Debug("layerfs: frame not cached", "frame", k, "err", err)
			}
		}
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

// readRange reads bytes [off, off+n) of the data blob (frames.Reader:
// bounded attempts, each bounded in time; each failed one is counted).
func (f *fetcher) readRange(ctx context.Context, off, n int64) ([]byte, error) {
	b, err := f.reader.Read(ctx, frames.Span{Off: off, Len: n})
	if err != nil {
		return nil, err
	}
	f.st.requests.Add(1)
	f.st.fetchedBytes.Add(n)
	return b, nil
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
