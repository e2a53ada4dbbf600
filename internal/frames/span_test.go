package frames_test

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/internal/frames"
)

func TestCover(t *testing.T) {
	items := []frames.Span{{0, 100}, {100, 50}, {300, 100}}
	id := func(s frames.Span) frames.Span { return s }
	for _, tc := range []struct {
		want frames.Span
		n    int
		ok   bool
	}{
		{frames.Span{0, 100}, 1, true}, {frames.Span{10, 20}, 1, true}, {frames.Span{90, 50}, 2, true},
		{frames.Span{140, 20}, 0, false}, // past the second
		{frames.Span{200, 10}, 0, false}, // in none
		{frames.Span{350, 50}, 1, true},
		{frames.Span{350, 60}, 0, false}, // past the last
		{frames.Span{0, 0}, 0, true},     // nothing asked
	} {
		parts, ok := frames.Cover(items, id, tc.want)
		if ok != tc.ok || len(parts) != tc.n {
			t.Errorf("Cover(%v) = %v, %v; want %d parts, %v", tc.want, parts, ok, tc.n, tc.ok)
		}
	}
}

func TestSetAdd(t *testing.T) {
	var s frames.Set
	for _, tc := range []struct {
		add  frames.Span
		gaps []frames.Span
		set  frames.Set
	}{
		{frames.Span{10, 10}, []frames.Span{{10, 10}}, frames.Set{{10, 10}}},
		{frames.Span{30, 10}, []frames.Span{{30, 10}}, frames.Set{{10, 10}, {30, 10}}},
		{frames.Span{12, 6}, nil, frames.Set{{10, 10}, {30, 10}}},
		{frames.Span{20, 10}, []frames.Span{{20, 10}}, frames.Set{{10, 30}}},              // fills the hole, touching both
		{frames.Span{5, 45}, []frames.Span{{5, 5}, {40, 10}}, frames.Set{{5, 45}}},        // around
		{frames.Span{60, 10}, []frames.Span{{60, 10}}, frames.Set{{5, 45}, {60, 10}}},     // after
		{frames.Span{0, 2}, []frames.Span{{0, 2}}, frames.Set{{0, 2}, {5, 45}, {60, 10}}}, // before
		{frames.Span{1, 64}, []frames.Span{{2, 3}, {50, 10}}, frames.Set{{0, 70}}},        // over several
	} {
		gaps := s.Add(tc.add)
		if d := cmp.Diff(tc.gaps, gaps); d != "" {
			t.Errorf("Add(%v) gaps (-want +got):\n%s", tc.add, d)
		}
		if d := cmp.Diff(tc.set, s); d != "" {
			t.Errorf("after Add(%v) set (-want +got):\n%s", tc.add, d)
		}
	}
}
