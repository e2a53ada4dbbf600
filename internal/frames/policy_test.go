package frames_test

import (
	"context"
	"errors"
	"fmt"
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

func TestSteps(t *testing.T) {
	fs := []layerindex.Frame{{USize: 10}, {USize: 10}, {USize: 10}, {USize: 25}, {USize: 10}, {USize: 10}}
	for _, tc := range []struct {
		first, last int
		max         int64
		want        [][2]int
	}{
		{0, 5, 100, [][2]int{{0, 5}}},
		{0, 5, 30, [][2]int{{0, 2}, {3, 3}, {4, 5}}},
		{1, 4, 20, [][2]int{{1, 2}, {3, 3}, {4, 4}}},
		{3, 3, 5, [][2]int{{3, 3}}}, // one frame always goes, whatever its size
		{0, -1, 10, nil},            // no frames
	} {
		if diff := cmp.Diff(tc.want, frames.Steps(fs, tc.first, tc.last, tc.max)); diff != "" {
			t.Errorf("Steps(%d, %d, %d) (-want +got):\n%s", tc.first, tc.last, tc.max, diff)
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

// flaky fails its first fails reads, then serves zeros. With hold, its
// first read ignores its context and returns only once hold is closed
// (or after 10 s), and then sets held.
type flaky struct {
	calls atomic.Int32
	fails int32
	hold  chan struct{}
	held  atomic.Bool
	short bool
}

func (s *flaky) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	c := s.calls.Add(1)
	if s.hold != nil && c == 1 {
		select { // not ctx.Done()
		case <-s.hold:
		case <-time.After(10 * time.Second):
		}
		s.held.Store(true)
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
	// fails notes the failed attempts as the reader reports them: "1+"
	// for attempt 1, another following.
	var fails []string
	note := func(_ frames.Span, attempt int, _ error, again bool) {
		f := fmt.Sprint(attempt)
		if again {
			f += "+"
		}
		fails = append(fails, f)
	}
	for _, tc := range []struct {
		name  string
		src   *flaky
		r     frames.Reader
		err   string // in the error; "" for none
		fails []string
		calls int32
	}{
		{name: "two failures then success", src: &flaky{fails: 2}, r: frames.Reader{Attempts: 3},
			fails: []string{"1+", "2+"}, calls: 3},
		{name: "always failing", src: &flaky{fails: 5}, r: frames.Reader{Attempts: 3},
			err: "bytes 10-109: 3 attempts: flaky", fails: []string{"1+", "2+", "3"}, calls: 3},
		{name: "default attempts", src: &flaky{fails: 5},
			err: "3 attempts", fails: []string{"1+", "2+", "3"}, calls: 3},
		{name: "a short answer", src: &flaky{short: true}, r: frames.Reader{Attempts: 1},
			err: "returned 99 bytes, want 100", fails: []string{"1"}, calls: 1},
		// An attempt that overstays is abandoned at its deadline, even
		// when the source ignores its context.
		{name: "a slow first attempt", src: &flaky{hold: make(chan struct{})}, r: frames.Reader{Attempts: 2, AttemptTimeout: 50 * time.Millisecond},
			fails: []string{"1+"}, calls: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fails = nil
			r := tc.r
			r.Source, r.OnFail = tc.src, note
			b, err := r.Read(ctx, s)
			if tc.src.hold != nil {
				if tc.src.held.Load() {
					t.Errorf("Read waited for the attempt that overstayed")
				}
				close(tc.src.hold)
			}
			switch {
			case tc.err == "" && (err != nil || len(b) != 100):
				t.Errorf("Read: %d bytes, %v; want 100 bytes", len(b), err)
			case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
				t.Errorf("Read: %v; want an error with %q", err, tc.err)
			}
			if !slices.Equal(fails, tc.fails) {
				t.Errorf("failed attempts %v, want %v", fails, tc.fails)
			}
			if n := tc.src.calls.Load(); n != tc.calls {
				t.Errorf("%d calls, want %d", n, tc.calls)
			}
		})
	}
	t.Run("cancelled", func(t *testing.T) {
		// A cancelled caller stops retrying.
		fails = nil
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		r := &frames.Reader{Source: &flaky{fails: 5}, Attempts: 5, OnFail: note}
		if _, err := r.Read(cctx, s); err == nil || !slices.Equal(fails, []string{"1"}) {
			t.Errorf("cancelled: failed attempts %v, %v; want one, and an error", fails, err)
		}
	})
}
