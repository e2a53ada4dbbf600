package layerindex

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// A frame's bytes depend only on its content, not on what the encoder
// compressed before: the builder reuses encoders across frames and layers.
func TestFrameStateless(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	gen := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			if r.IntN(4) == 0 {
				b[i] = byte(r.UintN(256))
			} else {
				b[i] = "abcdefgh"[r.IntN(8)]
			}
		}
		return b
	}
	inputs := [][]byte{gen(100), gen(1000), gen(200 << 10), gen(FrameSize), bytes.Repeat([]byte("x"), FrameSize), gen(FrameMinCut + 17)}
	fresh := func(p []byte) []byte {
		enc, err := newFrameEncoder()
		if err != nil {
			t.Fatal(err)
		}
		defer enc.Close()
		return enc.EncodeAll(p, nil)
	}
	enc, err := newFrameEncoder()
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	for round := range 3 {
		for i, in := range inputs {
			want := fresh(in)
			enc.EncodeAll(inputs[(i+round+1)%len(inputs)], nil) // some other history
			if got := enc.EncodeAll(in, nil); !bytes.Equal(got, want) {
				t.Fatalf("round %d input %d: reused encoder gives different bytes", round, i)
			}
		}
	}
}
