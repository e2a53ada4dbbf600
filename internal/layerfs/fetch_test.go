package layerfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/layerindex"
)

// countingSource serves data, counting requests, after an optional delay.
type countingSource struct {
	data     []byte
	requests atomic.Int64
	delay    time.Duration
	fail     atomic.Bool
}

func (s *countingSource) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	s.requests.Add(1)
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if s.fail.Load() {
		return nil, errors.New("unavailable")
	}
	return bytes.Clone(s.data[off : off+n]), nil
}

// sixFrames is a layer of one incompressible file of six frames.
func sixFrames(t *testing.T) (*layerindex.Index, []byte, []byte) {
	t.Helper()
	ix, data, content := manyFrames(t, 6)
	if len(ix.Frames) != 6 {
		t.Fatalf("%d frames, want 6", len(ix.Frames))
	}
	return ix, data, content
}

func newTestFetcher(ix *layerindex.Index, src Source, c *cache.Cache, opts Options) (*fetcher, *counters) {
	if opts.MissWindow == 0 {
		opts.MissWindow = -1
	}
	opts = opts.withDefaults()
	st := &counters{}
	return newFetcher(ix, src, c, &opts, st), st
}

func checkFrames(t *testing.T, ix *layerindex.Index, content []byte, first int, got [][]byte) {
	t.Helper()
	for i, b := range got {
		fr := ix.Frames[first+i]
		if !bytes.Equal(b, content[fr.UOffset:fr.UOffset+fr.USize]) {
			t.Errorf("frame %d: wrong content", first+i)
		}
	}
}

func TestFetcherCoalesces(t *testing.T) {
	ix, data, content := sixFrames(t)
	for _, tc := range []struct {
		max      int64
		requests int64
	}{{64 << 20, 1}, {2*ix.Frames[0].CSize + 10, 3}, {1, 6}} {
		src := &countingSource{data: data}
		f, st := newTestFetcher(ix, src, nil, Options{MaxFetchBytes: tc.max})
		got, err := f.frames(context.Background(), 0, 5)
		if err != nil {
			t.Fatal(err)
		}
		checkFrames(t, ix, content, 0, got)
		if n := src.requests.Load(); n != tc.requests {
			t.Errorf("MaxFetchBytes %d: %d requests, want %d", tc.max, n, tc.requests)
		}
		if st.fetchedBytes.Load() != ix.DataSize || st.fetchedFrames.Load() != 6 {
			t.Errorf("counted %d bytes, %d frames", st.fetchedBytes.Load(), st.fetchedFrames.Load())
		}
		// Now in memory.
		if _, err := f.frames(context.Background(), 2, 3); err != nil || src.requests.Load() != tc.requests {
			t.Errorf("frames in memory fetched again: %v", err)
		}
	}
}

func TestFetcherSingleflight(t *testing.T) {
	ix, data, content := sixFrames(t)
	src := &countingSource{data: data, delay: 100 * time.Millisecond}
	f, _ := newTestFetcher(ix, src, nil, Options{})
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := f.frames(context.Background(), 2, 3)
			if err != nil {
				t.Error(err)
				return
			}
			checkFrames(t, ix, content, 2, got)
		}()
	}
	wg.Wait()
	if n := src.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}

	// A reader that gives up does not fail the flight for the others.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := f.frames(ctx, 4, 4); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("interrupted reader: %v", err)
	}
	got, err := f.frames(context.Background(), 4, 4)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 4, got)
	if n := src.requests.Load(); n != 2 {
		t.Errorf("%d requests, want 2", n)
	}
}

func TestFetcherPrefetch(t *testing.T) {
	ix, data, content := sixFrames(t)
	src := &countingSource{data: data, delay: 20 * time.Millisecond}
	f, _ := newTestFetcher(ix, src, nil, Options{})
	f.prefetch(1, 7) // past the end is ignored
	got, err := f.frames(context.Background(), 1, 5)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 1, got)
	if n := src.requests.Load(); n != 1 {
		t.Errorf("%d requests, want the prefetch's one", n)
	}
}

func TestFetcherUsesCache(t *testing.T) {
	ix, data, content := sixFrames(t)
	c, err := cache.Open(t.TempDir(), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src := &countingSource{data: data}
	f, _ := newTestFetcher(ix, src, c, Options{})
	if _, err := f.frames(context.Background(), 0, 2); err != nil {
		t.Fatal(err)
	}
	f.fills.Wait() // frames are cached after readers have them
	src.fail.Store(true)
	f, st := newTestFetcher(ix, src, c, Options{Attempts: 1})
	got, err := f.frames(context.Background(), 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 0, got)
	if st.cacheHits.Load() != 3 || src.requests.Load() != 1 {
		t.Errorf("%d cache hits, %d requests; want 3, 1", st.cacheHits.Load(), src.requests.Load())
	}
}

func TestFetcherFailureRemembered(t *testing.T) {
	ix, data, content := sixFrames(t)
	src := &countingSource{data: data}
	src.fail.Store(true)
	f, st := newTestFetcher(ix, src, nil, Options{Attempts: 2})
	if _, err := f.frames(context.Background(), 0, 0); err == nil {
		t.Fatal("no error from a failing source")
	}
	if n := src.requests.Load(); n != 2 || st.sourceErrors.Load() != 2 {
		t.Errorf("%d requests, %d errors counted; want 2 attempts", n, st.sourceErrors.Load())
	}
	// The kernel's immediate retry gets the same answer without waiting.
	if _, err := f.frames(context.Background(), 0, 1); err == nil || src.requests.Load() != 2 {
		t.Errorf("retry: %v after %d requests; want the remembered failure", err, src.requests.Load())
	}
	// Other frames are not affected, and the failure is forgotten in time.
	src.fail.Store(false)
	if _, err := f.frames(context.Background(), 1, 1); err != nil {
		t.Errorf("another frame: %v", err)
	}
	f.mu.Lock()
	f.failed[0] = failure{time.Now().Add(-failMemory), f.failed[0].err}
	f.mu.Unlock()
	got, err := f.frames(context.Background(), 0, 0)
	if err != nil {
		t.Fatalf("after the failure expired: %v", err)
	}
	checkFrames(t, ix, content, 0, got)
}

// manyFrames is a layer of one incompressible file of n frames.
func manyFrames(t *testing.T, n int) (*layerindex.Index, []byte, []byte) {
	t.Helper()
	content := make([]byte, n*layerindex.FrameSize)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range content {
		content[i] = byte(r.Uint32())
	}
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "f", Size: int64(len(content)), Mode: 0o644})
	tw.Write(content)
	tw.Close()
	var data bytes.Buffer
	ix, err := layerindex.Build(context.Background(), &tb, &data, layerindex.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return ix, data.Bytes(), content
}

// waitIdle waits until f has no flight left.
func waitIdle(t *testing.T, f *fetcher) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		f.mu.Lock()
		n := len(f.inflight)
		f.mu.Unlock()
		if n == 0 {
			f.fills.Wait() // and they are cached
			return
		}
	}
	t.Fatal("flights did not end")
}

func TestFetcherMissWindow(t *testing.T) {
	ix, data, content := manyFrames(t, 24) // 3 MiB: three windows of 8 frames
	window := int64(8 * layerindex.FrameSize)
	c, err := cache.Open(t.TempDir(), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src := &countingSource{data: data}
	f, st := newTestFetcher(ix, src, c, Options{MissWindow: window})
	defer f.close()
	got, err := f.frames(context.Background(), 10, 10)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 10, got)
	waitIdle(t, f)
	// The window of frame 10 is frames 8-15, fetched with one request.
	if n := src.requests.Load(); n != 1 || st.fetchedFrames.Load() != 8 {
		t.Errorf("%d requests, %d frames; want 1 request of the window's 8 frames", n, st.fetchedFrames.Load())
	}
	for k := 8; k < 16; k++ {
		if !f.cached(k) {
			t.Errorf("frame %d of the window not cached", k)
		}
	}
	// Frames of the window are now reads without requests.
	if _, err := f.frames(context.Background(), 15, 15); err != nil || src.requests.Load() != 1 {
		t.Errorf("frame 15: %v, %d requests", err, src.requests.Load())
	}
	// A read spanning two windows widens to both.
	if _, err := f.frames(context.Background(), 23, 23); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, f)
	if st.fetchedFrames.Load() != 16 {
		t.Errorf("%d frames fetched, want 16", st.fetchedFrames.Load())
	}

	// A read of cached frames is not widened: a second fetcher on the
	// same cache (a restarted node) reads frame 9 from the cache alone.
	f2, st2 := newTestFetcher(ix, src, c, Options{MissWindow: window})
	defer f2.close()
	if _, err := f2.frames(context.Background(), 9, 9); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, f2)
	if st2.cacheHits.Load() != 1 || st2.fetchedFrames.Load() != 0 {
		t.Errorf("cached read: %d cache hits, %d fetched; want 1, 0", st2.cacheHits.Load(), st2.fetchedFrames.Load())
	}
}

func TestFetcherPrefetchListAndRecording(t *testing.T) {
	ix, data, content := manyFrames(t, 40)
	src := &countingSource{data: data, delay: 20 * time.Millisecond}
	f, st := newTestFetcher(ix, src, nil, Options{PrefetchStreams: 3})
	defer f.close()

	f.startRecording()
	for _, k := range []int{7, 3, 7, 30} {
		if _, err := f.frames(context.Background(), k, k); err != nil {
			t.Fatal(err)
		}
	}
	f.prefetch(31, 32) // prefetches are not reads
	rec := f.stopRecording()
	recorded, seq := rec.Frames, rec.Seq
	if want := []int{7, 3, 30}; !slices.Equal(recorded, want) {
		t.Errorf("recorded %v, want %v (first-read order)", recorded, want)
	}
	if len(seq) != len(recorded) || !slices.IsSorted(seq) || seq[0] == seq[1] || seq[1] == seq[2] {
		t.Errorf("sequence numbers %v, want %d increasing", seq, len(recorded))
	}
	if again := f.stopRecording(); again.Frames != nil {
		t.Error("a stopped recording returns frames again")
	}
	waitIdle(t, f)

	// A list: adjacent frames in one request, split over the streams at
	// run boundaries; frames in memory are skipped; out of range ignored.
	before := src.requests.Load()
	list := []int{10, 11, 12, 13, 20, 21, 22, 23, 25, 26, 7, -1, 99}
	slices.Sort(list)
	start := time.Now()
	f.prefetchList(list)
	got, err := f.frames(context.Background(), 10, 26)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 10, got)
	if d := time.Since(start); d > 5*src.delay {
		t.Errorf("prefetch and read took %v: streams not concurrent?", d)
	}
	waitIdle(t, f)
	// Runs 10-13, 20-23, 25-26 by the prefetch (7 is in memory); the read
	// of 10-26 adds 14-19 and 24.
	if n := src.requests.Load() - before; n != 5 {
		t.Errorf("%d requests, want 5", n)
	}
	if n := st.fetchedFrames.Load(); n != 3+2+10+7 { // reads, readahead, list, read
		t.Errorf("%d frames fetched in all", n)
	}
}

func TestFetcherClose(t *testing.T) {
	ix, data, _ := manyFrames(t, 4)
	src := &countingSource{data: data, delay: time.Hour}
	f, _ := newTestFetcher(ix, src, nil, Options{})
	f.prefetchList([]int{0, 1, 2, 3})
	done := make(chan struct{})
	go func() { f.close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("close did not cancel a hanging fetch")
	}
	if _, err := f.frames(context.Background(), 0, 0); !errors.Is(err, errClosed) {
		t.Errorf("read after close: %v", err)
	}
}

func TestFetcherPrefetchGapsAndOrder(t *testing.T) {
	ix, data, content := manyFrames(t, 40)
	fsz := ix.Frames[0].CSize
	src := &orderSource{countingSource: countingSource{data: data}}
	f, st := newTestFetcher(ix, src, nil, Options{PrefetchStreams: 1, PrefetchGap: 2 * fsz})
	defer f.close()
	// 30-31 are wanted first; 1-2 and 5-6 join across the 2-frame gap 3-4;
	// 10 and 20 stay apart (gaps too wide).
	f.prefetchList([]int{30, 31, 20, 1, 2, 5, 6, 10})
	got, err := f.frames(context.Background(), 1, 6)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 1, got)
	waitIdle(t, f)
	if n := st.fetchedFrames.Load(); n != 10 {
		t.Errorf("%d frames fetched, want 10 (8 wanted, 2 of the gap)", n)
	}
	want := []int64{ix.Frames[30].COffset, ix.Frames[20].COffset, ix.Frames[1].COffset, ix.Frames[10].COffset}
	if got := src.offsets(); !slices.Equal(got, want) {
		t.Errorf("requests at %v, want %v (first wanted first, one per run)", got, want)
	}
}

// orderSource records the offsets of requests in order.
type orderSource struct {
	countingSource
	mu   sync.Mutex
	offs []int64
}

func (s *orderSource) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	s.mu.Lock()
	s.offs = append(s.offs, off)
	s.mu.Unlock()
	return s.countingSource.ReadAt(ctx, off, n)
}

func (s *orderSource) offsets() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.offs)
}

// pendingSource is a source whose frames 2, 3 and 4 are on their way, and
// arrive when released.
type pendingSource struct {
	countingSource
	ix      *layerindex.Index
	release map[int64]chan struct{} // by frame offset
	reads   sync.Map                // offset → length of each read
}

func (s *pendingSource) Pending(off, n int64) bool {
	_, ok := s.release[off]
	return ok && n == s.ix.Frames[s.frameAt(off)].CSize
}

func (s *pendingSource) Await(ctx context.Context, off, n int64) {
	if ch, ok := s.release[off]; ok {
		select {
		case <-ch:
		case <-ctx.Done():
		}
	}
}

func (s *pendingSource) frameAt(off int64) int {
	for k, fr := range s.ix.Frames {
		if fr.COffset == off {
			return k
		}
	}
	return -1
}

func (s *pendingSource) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	s.reads.Store(off, n)
	if ch, ok := s.release[off]; ok {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s.countingSource.ReadAt(ctx, off, n)
}

func TestFetcherPrefetchPending(t *testing.T) {
	ix, data, content := manyFrames(t, 8)
	src := &pendingSource{countingSource: countingSource{data: data}, ix: ix, release: map[int64]chan struct{}{}}
	for _, k := range []int{2, 3, 4} {
		src.release[ix.Frames[k].COffset] = make(chan struct{})
	}
	f, _ := newTestFetcher(ix, src, nil, Options{})
	defer f.close()
	f.prefetchList([]int{4, 3, 2, 5, 6})
	// Pending frames are read one by one: frame 4 is there as soon as its
	// bytes are, whatever 2 and 3 do.
	close(src.release[ix.Frames[4].COffset])
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := f.frames(ctx, 4, 4)
	if err != nil {
		t.Fatalf("frame 4 waited for the other pending frames: %v", err)
	}
	checkFrames(t, ix, content, 4, got)
	close(src.release[ix.Frames[2].COffset])
	close(src.release[ix.Frames[3].COffset])
	got, err = f.frames(ctx, 2, 6)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, ix, content, 2, got)
	// The others were joined into one run as before.
	want := map[int64]int64{}
	for _, k := range []int{2, 3, 4} {
		want[ix.Frames[k].COffset] = ix.Frames[k].CSize
	}
	want[ix.Frames[5].COffset] = ix.Frames[5].CSize + ix.Frames[6].CSize
	n := 0
	src.reads.Range(func(k, v any) bool {
		n++
		if want[k.(int64)] != v.(int64) {
			t.Errorf("read %d+%d, want the reads %v", k, v, want)
		}
		return true
	})
	if n != len(want) {
		t.Errorf("%d reads, want %d", n, len(want))
	}
}

// A frame whose bytes take longer to arrive than the fetch bounds is not
// failed: the bounds start once the bytes are there.
func TestFetcherPendingOutlastsBounds(t *testing.T) {
	ix, data, content := manyFrames(t, 4)
	src := &pendingSource{countingSource: countingSource{data: data}, ix: ix, release: map[int64]chan struct{}{}}
	src.release[ix.Frames[2].COffset] = make(chan struct{})
	f, _ := newTestFetcher(ix, src, nil, Options{FetchTimeout: 100 * time.Millisecond, AttemptTimeout: 50 * time.Millisecond})
	defer f.close()
	f.prefetchList([]int{2})
	time.Sleep(300 * time.Millisecond)
	close(src.release[ix.Frames[2].COffset])
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := f.frames(ctx, 2, 2)
	if err != nil {
		t.Fatalf("a frame that arrived after the fetch bounds failed: %v", err)
	}
	checkFrames(t, ix, content, 2, got)
}

func TestFetcherReadMiss(t *testing.T) {
	ix, data, _ := sixFrames(t)
	c, err := cache.Open(t.TempDir(), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var waits []time.Duration
	opts := Options{ReadMiss: func(d time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		waits = append(waits, d)
	}}
	src := &countingSource{data: data, delay: 20 * time.Millisecond}
	f, _ := newTestFetcher(ix, src, c, opts)
	misses := func() []time.Duration {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(waits)
	}
	if _, err := f.frames(context.Background(), 0, 1); err != nil {
		t.Fatal(err)
	}
	if w := misses(); len(w) != 1 || w[0] < src.delay {
		t.Fatalf("after a fetch: misses %v, want one of at least %v", w, src.delay)
	}
	if _, err := f.frames(context.Background(), 0, 1); err != nil { // in memory
		t.Fatal(err)
	}
	f.fills.Wait()
	f.close()
	// A fetcher of the same cache without memory: frames from the cache
	// are no miss, frames from the source are.
	f, _ = newTestFetcher(ix, src, c, opts)
	defer f.close()
	if _, err := f.frames(context.Background(), 0, 1); err != nil {
		t.Fatal(err)
	}
	if w := misses(); len(w) != 1 {
		t.Fatalf("frames in memory or the cache counted as misses: %v", w)
	}
	if _, err := f.frames(context.Background(), 1, 2); err != nil {
		t.Fatal(err)
	}
	if w := misses(); len(w) != 2 {
		t.Errorf("a read of a cached and a missing frame: misses %v, want 2", w)
	}
}

// TestFetcherStreamsWalks: reads that miss window after window in the
// layer's order (a tar or copy of the tree) stream the windows after them,
// each its own request, so most reads find their frames on the way;
// reads that jump around do not.
func TestFetcherStreamsWalks(t *testing.T) {
	ix, data, content := manyFrames(t, 40)
	src := &countingSource{data: data, delay: 5 * time.Millisecond}
	f, st := newTestFetcher(ix, src, nil, Options{MissWindow: layerindex.FrameSize})
	ctx := context.Background()
	for k := range len(ix.Frames) {
		got, err := f.frames(ctx, k, k)
		if err != nil {
			t.Fatal(err)
		}
		checkFrames(t, ix, content, k, got)
	}
	waitIdle(t, f)
	if n := st.streamed.Load(); n < int64(len(ix.Frames))-walkStreak-1 {
		t.Errorf("a walk of %d frames streamed %d of them ahead", len(ix.Frames), n)
	}
	if r := src.requests.Load(); r > int64(len(ix.Frames))+1 {
		t.Errorf("%d requests for %d frames: frames fetched twice", r, len(ix.Frames))
	}

	// Jumps: no stream.
	f2, st2 := newTestFetcher(ix, &countingSource{data: data}, nil, Options{MissWindow: layerindex.FrameSize})
	for _, k := range []int{30, 2, 17, 9, 25, 4, 36, 12} {
		if _, err := f2.frames(ctx, k, k); err != nil {
			t.Fatal(err)
		}
	}
	waitIdle(t, f2)
	if n := st2.streamed.Load(); n != 0 {
		t.Errorf("random reads streamed %d frames", n)
	}
}
