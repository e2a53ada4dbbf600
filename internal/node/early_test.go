package node

import (
	"bytes"
	"context"
	"testing"
)

func TestEarlyBlobRead(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789"), 100)
	piece := func(off, n int64) *earlyPiece {
		p := &earlyPiece{off: off, n: n, done: make(chan struct{}), b: data[off : off+n]}
		close(p.done)
		return p
	}
	eb := &earlyBlob{pieces: []*earlyPiece{piece(0, 100), piece(100, 50), piece(300, 100)}}
	for _, tc := range []struct {
		off, n int64
		ok     bool
	}{
		{0, 100, true}, {10, 20, true}, {90, 50, true}, // within one piece, across two adjacent
		{140, 20, false}, // past the second piece
		{200, 10, false}, // in no piece
		{350, 50, true},
		{350, 60, false}, // past the last
	} {
		b, ok := eb.read(context.Background(), tc.off, tc.n)
		if ok != tc.ok || (ok && !bytes.Equal(b, data[tc.off:tc.off+tc.n])) {
			t.Errorf("read(%d, %d) = %q, %v; want ok %v", tc.off, tc.n, b, ok, tc.ok)
		}
	}
	// A failed piece is not used.
	bad := &earlyPiece{off: 0, n: 10, done: make(chan struct{}), err: context.Canceled}
	close(bad.done)
	if _, ok := (&earlyBlob{pieces: []*earlyPiece{bad}}).read(context.Background(), 0, 10); ok {
		t.Error("a failed piece was used")
	}
	// A reader that gives up does not wait for a piece.
	slow := &earlyPiece{off: 0, n: 10, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, ok := (&earlyBlob{pieces: []*earlyPiece{slow}}).read(ctx, 0, 10); ok {
		t.Error("a cancelled reader got bytes of an unfinished piece")
	}
}
