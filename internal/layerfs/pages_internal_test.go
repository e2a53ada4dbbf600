package layerfs

import (
	"slices"
	"testing"
)

func TestIntervalsAdd(t *testing.T) {
	var s intervals
	for _, tc := range []struct {
		lo, hi int64
		gaps   [][2]int64
		set    intervals
	}{
		{10, 20, [][2]int64{{10, 20}}, intervals{{10, 20}}},
		{30, 40, [][2]int64{{30, 40}}, intervals{{10, 20}, {30, 40}}},
		{12, 18, nil, intervals{{10, 20}, {30, 40}}},
		{20, 30, [][2]int64{{20, 30}}, intervals{{10, 40}}},              // fills the hole, touching both
		{5, 50, [][2]int64{{5, 10}, {40, 50}}, intervals{{5, 50}}},       // around
		{60, 70, [][2]int64{{60, 70}}, intervals{{5, 50}, {60, 70}}},     // after
		{0, 2, [][2]int64{{0, 2}}, intervals{{0, 2}, {5, 50}, {60, 70}}}, // before
		{1, 65, [][2]int64{{2, 5}, {50, 60}}, intervals{{0, 70}}},        // over several
	} {
		gaps := s.add(tc.lo, tc.hi)
		if !slices.Equal(gaps, tc.gaps) || !slices.Equal(s, tc.set) {
			t.Errorf("add(%d, %d) = %v, set %v; want %v, %v", tc.lo, tc.hi, gaps, s, tc.gaps, tc.set)
		}
	}
}

func TestFetcherRecordsPages(t *testing.T) {
	ix, data, _ := manyFrames(t, 4)
	f, _ := newTestFetcher(ix, &countingSource{data: data}, nil, Options{})
	defer f.close()
	f.notePages(0, 100) // not recording
	f.startRecording()
	f.notePages(8192, 4096)
	f.notePages(12288, 100) // continues the last: one range
	f.notePages(0, 4096)
	f.notePages(8000, 5000) // only [8000, 8192) is new
	rec := f.stopRecording()
	want := [][2]int64{{8192, 4196}, {0, 4096}, {8000, 192}, {12388, 612}}
	if !slices.Equal(rec.Pages, want) {
		t.Errorf("pages %v, want %v", rec.Pages, want)
	}
	if len(rec.PageSeq) != 4 || !slices.IsSorted(rec.PageSeq) || rec.PageSeq[0] == rec.PageSeq[1] {
		t.Errorf("page sequence numbers %v, want 4 increasing", rec.PageSeq)
	}
}
