package layerfs

import (
	"slices"
	"testing"
)

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
