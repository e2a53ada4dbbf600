package frames

import (
	"slices"

	"github.com/opencontainers/go-digest"
)

// A Want is a span of a blob that an ordered fetch (a start-up profile's
// frames, a start-up pack's chunks) wants, with its rank: its place in the
// order the reads will need it, 0 first.
type Want struct {
	Blob digest.Digest
	Span
	Rank int
}

// A Batch is one request of an ordered fetch: wants of one blob, in rank
// order, as indexes into the wants given to Batches.
type Batch struct {
	Blob  digest.Digest
	Wants []int
	First int   // the place of its first want in rank order
	Bytes int64 // the bytes of its wants
}

// Batches orders wants by rank and cuts them into the requests of an
// ordered fetch, in the order they go out (by their first want): each
// holds wants of one blob, at most maxBytes of them (or one want), and
// none that comes more than stale bytes (of all the wants, in rank order)
// after the batch's first, so a blob read rarely does not pull its late
// wants forward.
func Batches(wants []Want, maxBytes, stale int64) []Batch {
	order := make([]int, len(wants))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return wants[a].Rank - wants[b].Rank })
	var out []Batch
	open := map[digest.Digest]int{} // blob → its open batch, in out
	starts := map[int]int64{}       // batch → where its first want is
	var at int64
	for place, i := range order {
		w := wants[i]
		b, ok := open[w.Blob]
		if ok && (out[b].Bytes+w.Len > maxBytes || at-starts[b] > stale) {
			ok = false
		}
		if !ok {
			b = len(out)
			out = append(out, Batch{Blob: w.Blob, First: place})
			open[w.Blob] = b
			starts[b] = at
		}
		out[b].Wants = append(out[b].Wants, i)
		out[b].Bytes += w.Len
		at += w.Len
	}
	slices.SortFunc(out, func(a, b Batch) int { return a.First - b.First })
	return out
}
