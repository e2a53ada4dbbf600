package expand

import (
	"context"
	"errors"
	"testing"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/store"
)

// A service makes one pack at a time: a pack asked for while another is
// being made waits, no longer than its request.
func TestPackOneAtATime(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	p := &api.Profile{Layers: []api.ProfileLayer{{Pages: [][2]int64{{0, 4096}}}}}
	s.packing <- struct{}{} // another pack is being made
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the request has given up
	if _, err := s.buildPack(ctx, "lib/app", p, nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("buildPack while another pack is made = %v, want context.Canceled", err)
	}
}
