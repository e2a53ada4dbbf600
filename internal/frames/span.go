// Package frames is the node's policy for fetching the bytes of an
// expanded layer's data blob: which frames a read fetches besides its own
// (MissWindow, Readahead), how frames are coalesced into requests and in
// which order those go out (Runs, Bridge, ByRank, Batches, Steps), how a
// request is retried (Reader), and how ranges are looked up among the
// pieces already fetched or on their way (Cover, Set). Its one range type
// is Span; the FUSE view (layerfs), its background completer, and the
// start-up profiles' early fetch and packs (startup) all describe bytes
// with it.
//
// All of it but Reader is pure computation, plans as plain data; its
// callers hold the state (flights, caches, failures) and carry them out.
package frames

import (
	"cmp"
	"slices"
)

// A Span is the byte range [Off, Off+Len) of a blob or a stream.
type Span struct {
	Off, Len int64
}

// End is the offset just past s.
func (s Span) End() int64 { return s.Off + s.Len }

// Cover returns the items that cover want without a gap, in order, or
// false when they do not. items are sorted by their spans (span(item)),
// which do not overlap.
func Cover[T any](items []T, span func(T) Span, want Span) ([]T, bool) {
	i, _ := slices.BinarySearchFunc(items, want.Off, func(it T, off int64) int {
		s := span(it)
		switch {
		case s.End() <= off:
			return -1
		case s.Off > off:
			return 1
		}
		return 0
	})
	var parts []T
	for at, end := want.Off, want.End(); at < end; i++ {
		if i >= len(items) {
			return nil, false
		}
		s := span(items[i])
		if s.Off > at || s.End() <= at {
			return nil, false
		}
		parts = append(parts, items[i])
		at = s.End()
	}
	return parts, true
}

// A Set is a set of byte ranges: sorted, neither overlapping nor touching.
type Set []Span

// Add adds s to the set and returns the parts of it that were not in the
// set, in order.
func (set *Set) Add(s Span) (gaps []Span) {
	iv := *set
	lo, hi := s.Off, s.End()
	i, _ := slices.BinarySearchFunc(iv, lo, func(x Span, lo int64) int { return cmp.Compare(x.End(), lo) })
	// iv[i] is the first span ending at or after lo.
	j := i
	at := lo
	for ; j < len(iv) && iv[j].Off <= hi; j++ {
		if iv[j].Off > at {
			gaps = append(gaps, Span{at, iv[j].Off - at})
		}
		at = max(at, iv[j].End())
	}
	if at < hi {
		gaps = append(gaps, Span{at, hi - at})
	}
	merged := s
	if i < j {
		lo, hi = min(lo, iv[i].Off), max(hi, iv[j-1].End())
		merged = Span{lo, hi - lo}
	}
	*set = slices.Replace(iv, i, j, merged)
	return gaps
}
