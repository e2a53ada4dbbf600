package frames_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/frames"
)

func TestBatches(t *testing.T) {
	a, b := digest.FromString("a"), digest.FromString("b")
	const k = 64 << 10
	want := func(blob digest.Digest, off, n int64, rank int) frames.Want {
		return frames.Want{Blob: blob, Span: frames.Span{Off: off, Len: n}, Rank: rank}
	}
	wants := []frames.Want{
		want(a, 0, k, 3), want(b, 0, k, 1), want(a, 10*k, k, 0), want(a, 5*k, k, 2),
		want(a, 20*k, k, 4), want(a, 30*k, k, 5), want(a, 40*k, k, 6), // a batch of a is full at 4
		want(b, 50*k, 8*k, 7), // larger than a batch: alone
		want(b, 60*k, k, 8),
		want(a, 0, 100, 30), // ranked far after a's batch began: a batch of its own
	}
	for i := range 20 {
		wants = append(wants, want(digest.FromString("c"), int64(i)<<17, 100<<10, 9+i))
	}
	var got []string
	for _, bt := range frames.Batches(wants, 4*k, 1<<20) {
		if bt.Blob != a && bt.Blob != b {
			continue
		}
		s := fmt.Sprintf("%s@%d:", bt.Blob.Encoded()[:4], bt.First)
		for _, i := range bt.Wants {
			s += fmt.Sprintf(" %d", wants[i].Off/k)
		}
		got = append(got, s)
	}
	ea, eb := a.Encoded()[:4], b.Encoded()[:4]
	exp := []string{
		ea + "@0: 10 5 0 20", // first-read first, within the batch too
		eb + "@1: 0",
		ea + "@5: 30 40",
		eb + "@7: 50",
		eb + "@8: 60",
		ea + "@29: 0",
	}
	if !slices.Equal(got, exp) {
		t.Errorf("batches\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(exp, "\n"))
	}
}
