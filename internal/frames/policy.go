package frames

import (
	"slices"

	"github.com/strata-oci/strata/layerindex"
)

// Runs groups the frames ks, in increasing order, into the runs read with
// one request each: adjacent frames, at most maxBytes of them compressed
// (but at least one frame).
func Runs(frames []layerindex.Frame, ks []int, maxBytes int64) [][]int {
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

// Steps cuts the frames first to last into steps of adjacent frames, in
// order, each at most maxBytes of the uncompressed stream (but at least
// one frame), as inclusive ranges [first, last]: a background reader
// reads a step at a time and checks between steps that it may go on.
func Steps(frames []layerindex.Frame, first, last int, maxBytes int64) [][2]int {
	var out [][2]int
	for k := first; k <= last; {
		j, n := k, frames[k].USize
		for j < last && n+frames[j+1].USize <= maxBytes {
			j++
			n += frames[j].USize
		}
		out = append(out, [2]int{k, j})
		k = j + 1
	}
	return out
}

// MissWindow is the span of the uncompressed stream, aligned to w, around
// the frames first to last of a read that missed: files that sit together
// in a layer are read together, so its fetch takes every missing frame
// that starts in it (one round trip then serves the next reads too).
func MissWindow(frames []layerindex.Frame, first, last int, w int64) Span {
	lo := frames[first].UOffset / w * w
	hi := (frames[last].UOffset/w + 1) * w
	return Span{lo, hi - lo}
}

// Readahead returns the last frame a sequential read of a file should
// have fetched ahead: the frames after last (the read's last frame) that
// hold up to n bytes of the stream past it, within the file's frames (up
// to fileLast, and to the stream's last frame). It returns last when there
// is nothing ahead.
func Readahead(ix *layerindex.Index, last, fileLast int, n int64) int {
	if last >= fileLast || n <= 0 {
		return last
	}
	fr := &ix.Frames[last]
	until, found := ix.FramesFor(fr.UOffset+fr.USize+n-1, 1)
	if found < 0 || until > fileLast {
		until = fileLast // past the stream, or the file
	}
	return until
}

// Bridge returns the frames to fetch for the wanted frames want (sorted,
// distinct): those, and the frames between two wanted ones when they are
// all missing (missing) and add up to at most maxGap compressed bytes, so
// the two go in one request: a request costs a round trip, which on a
// slow link is worth more than those bytes. taken maps each bridging
// frame to the wanted frame after it, whose place in the order it takes.
func Bridge(frames []layerindex.Frame, want []int, maxGap int64, missing func(k int) bool) (fetch []int, taken map[int]int) {
	taken = map[int]int{}
	for i, k := range want {
		if i > 0 {
			prev := want[i-1]
			var gap int64
			ok := k-prev > 1
			for g := prev + 1; g < k && ok; g++ {
				gap += frames[g].CSize
				ok = gap <= maxGap && missing(g)
			}
			if ok {
				for g := prev + 1; g < k; g++ {
					taken[g] = k
					fetch = append(fetch, g)
				}
			}
		}
		fetch = append(fetch, k)
	}
	return fetch, taken
}

// ByRank orders runs, stably, by the first place (rank) any of their
// frames has in the order they are wanted; a frame without a rank comes
// after every ranked one.
func ByRank(runs [][]int, rank map[int]int) {
	first := func(run []int) int {
		r := len(rank)
		for _, k := range run {
			if v, ok := rank[k]; ok {
				r = min(r, v)
			}
		}
		return r
	}
	slices.SortStableFunc(runs, func(a, b []int) int { return first(a) - first(b) })
}
