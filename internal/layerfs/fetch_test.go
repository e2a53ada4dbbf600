package layerfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/layerindex"
)

func TestRuns(t *testing.T) {
	frames := []layerindex.Frame{{CSize: 10}, {CSize: 10}, {CSize: 10}, {CSize: 25}, {CSize: 10}, {CSize: 10}}
	tests := []struct {
		ks   []int
		max  int64
		want [][]int
	}{
		{[]int{0, 1, 2}, 100, [][]int{{0, 1, 2}}},
		{[]int{0, 2, 4, 5}, 100, [][]int{{0}, {2}, {4, 5}}},
		{[]int{0, 1, 2, 3, 4, 5}, 30, [][]int{{0, 1, 2}, {3}, {4, 5}}},
		{[]int{3}, 5, [][]int{{3}}}, // one frame always goes, whatever its size
		{nil, 10, nil},
	}
	for _, tc := range tests {
		if diff := cmp.Diff(tc.want, runs(frames, tc.ks, tc.max)); diff != "" {
			t.Errorf("runs(%v, %d) (-want +got):\n%s", tc.ks, tc.max, diff)
		}
	}
}

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
	content := make([]byte, 6*layerindex.FrameSize)
	r := rand.New(rand.NewPCG(1, 2))
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
	if len(ix.Frames) != 6 {
		t.Fatalf("%d frames, want 6", len(ix.Frames))
	}
	return ix, data.Bytes(), content
}

func newTestFetcher(ix *layerindex.Index, src Source, c *cache.Cache, opts Options) (*fetcher, *counters) {
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
