package frames_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/layerindex"
)

func TestRuns(t *testing.T) {
	fs := []layerindex.Frame{{CSize: 10}, {CSize: 10}, {CSize: 10}, {CSize: 25}, {CSize: 10}, {CSize: 10}}
	for _, tc := range []struct {
		ks   []int
		max  int64
		want [][]int
	}{
		{[]int{0, 1, 2}, 100, [][]int{{0, 1, 2}}},
		{[]int{0, 2, 4, 5}, 100, [][]int{{0}, {2}, {4, 5}}},
		{[]int{0, 1, 2, 3, 4, 5}, 30, [][]int{{0, 1, 2}, {3}, {4, 5}}},
		{[]int{3}, 5, [][]int{{3}}}, // one frame always goes, whatever its size
		{nil, 10, nil},
	} {
		if diff := cmp.Diff(tc.want, frames.Runs(fs, tc.ks, tc.max)); diff != "" {
			t.Errorf("Runs(%v, %d) (-want +got):\n%s", tc.ks, tc.max, diff)
		}
	}
}

// stream returns frames of usize bytes of stream each, csize compressed.
func stream(n int, usize, csize int64) []layerindex.Frame {
	out := make([]layerindex.Frame, n)
	for i := range out {
		out[i] = layerindex.Frame{UOffset: int64(i) * usize, USize: usize, COffset: int64(i) * csize, CSize: csize}
	}
	return out
}

func TestMissWindow(t *testing.T) {
	fs := stream(40, 128<<10, 50<<10) // 8 frames a MiB
	for _, tc := range []struct {
		first, last int
		want        frames.Span
	}{
		{0, 0, frames.Span{0, 1 << 20}},
		{9, 9, frames.Span{1 << 20, 1 << 20}},
		{7, 8, frames.Span{0, 2 << 20}}, // across a window's end
		{17, 30, frames.Span{2 << 20, 2 << 20}},
	} {
		if got := frames.MissWindow(fs, tc.first, tc.last, 1<<20); got != tc.want {
			t.Errorf("MissWindow(%d, %d) = %v, want %v", tc.first, tc.last, got, tc.want)
		}
	}
}

func TestReadahead(t *testing.T) {
	ix := &layerindex.Index{Frames: stream(40, 128<<10, 50<<10), StreamSize: 40 * 128 << 10}
	for _, tc := range []struct {
		last, fileLast int
		n              int64
		want           int
	}{
		{3, 30, 2 << 20, 19},  // 2 MiB: 16 frames ahead
		{3, 10, 2 << 20, 10},  // not past the file
		{10, 10, 2 << 20, 10}, // nothing ahead
		{3, 30, 1, 4},         // one byte ahead is the next frame
		{3, 30, 0, 3},         // no readahead
		{38, 39, 2 << 20, 39}, // not past the stream
	} {
		if got := frames.Readahead(ix, tc.last, tc.fileLast, tc.n); got != tc.want {
			t.Errorf("Readahead(last %d, fileLast %d, %d) = %d, want %d", tc.last, tc.fileLast, tc.n, got, tc.want)
		}
	}
}

func TestBridgeAndByRank(t *testing.T) {
	fs := []layerindex.Frame{{CSize: 10}, {CSize: 10}, {CSize: 10}, {CSize: 10}, {CSize: 30}, {CSize: 10}, {CSize: 10}, {CSize: 10}}
	present := map[int]bool{6: true}
	missing := func(k int) bool { return !present[k] }
	// Wanted 0, 2, 5, 7: 1 bridges 0 and 2 (10 bytes); 3-4 (40 bytes)
	// are over the gap; 6 is on the node.
	fetch, taken := frames.Bridge(fs, []int{0, 2, 5, 7}, 20, missing)
	if want := []int{0, 1, 2, 5, 7}; !slices.Equal(fetch, want) {
		t.Errorf("Bridge fetches %v, want %v", fetch, want)
	}
	if diff := cmp.Diff(map[int]int{1: 2}, taken); diff != "" {
		t.Errorf("taken (-want +got):\n%s", diff)
	}
	// The runs holding the first-wanted frames go first.
	rank := map[int]int{7: 0, 5: 1, 2: 2, 1: 2, 0: 3}
	runs := frames.Runs(fs, fetch, 1<<20)
	frames.ByRank(runs, rank)
	if diff := cmp.Diff([][]int{{7}, {5}, {0, 1, 2}}, runs); diff != "" {
		t.Errorf("ByRank (-want +got):\n%s", diff)
	}
}

// flaky fails its first fails reads, then serves zeros; slow ignores its
// context for the first read.
type flaky struct {
	calls atomic.Int32
	fails int32
	slow  bool
	short bool
}

func (s *flaky) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	c := s.calls.Add(1)
	if s.slow && c == 1 {
		time.Sleep(time.Second) // does not honour ctx
	}
	if c <= s.fails {
		return nil, errors.New("flaky")
	}
	if s.short {
		n--
	}
	return make([]byte, n), nil
}

func TestReader(t *testing.T) {
	ctx := context.Background()
	s := frames.Span{Off: 10, Len: 100}
	var retries int
	r := &frames.Reader{Source: &flaky{fails: 2}, Attempts: 3, OnRetry: func(frames.Span, int, error) { retries++ }}
	if b, failed, err := r.Read(ctx, s); err != nil || len(b) != 100 || failed != 2 || retries != 2 {
		t.Errorf("two failures then success: %d bytes, %d failed, %d retries, %v", len(b), failed, retries, err)
	}
	r = &frames.Reader{Source: &flaky{fails: 5}, Attempts: 3}
	if _, failed, err := r.Read(ctx, s); err == nil || failed != 3 || !strings.Contains(err.Error(), "bytes 10-109: 3 attempts: flaky") {
		t.Errorf("always failing: %d failed, %v", failed, err)
	}
	r = &frames.Reader{Source: &flaky{short: true}, Attempts: 1}
	if _, _, err := r.Read(ctx, s); err == nil || !strings.Contains(err.Error(), "returned 99 bytes, want 100") {
		t.Errorf("a short answer: %v", err)
	}
	// An attempt that overstays is abandoned at its deadline, even when
	// the source ignores its context.
	r = &frames.Reader{Source: &flaky{slow: true}, Attempts: 2, AttemptTimeout: 50 * time.Millisecond}
	start := time.Now()
	if b, failed, err := r.Read(ctx, s); err != nil || len(b) != 100 || failed != 1 {
		t.Errorf("a slow first attempt: %d failed, %v", failed, err)
	}
	if took := time.Since(start); took > 900*time.Millisecond {
		t.Errorf("took %s: the slow attempt was waited for", took)
	}
	// A cancelled caller stops retrying.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	r = &frames.Reader{Source: &flaky{fails: 5}, Attempts: 5}
	if _, failed, err := r.Read(cctx, s); err == nil || failed != 1 {
		t.Errorf("cancelled: %d failed, %v", failed, err)
	}
}
