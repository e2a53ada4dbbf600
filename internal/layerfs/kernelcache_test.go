package layerfs_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestKernelCaches: a directory listed once is listed again by the kernel
// from its cache, with the same entries and no request to the file system,
// and closing files costs one FLUSH request on the whole mount, not one
// per close.
func TestKernelCaches(t *testing.T) {
	testenv.RequireFUSE(t)
	var ents []ent
	ents = append(ents, dir("d/", 0o755))
	for i := range 300 { // more than one READDIRPLUS answer holds
		ents = append(ents, file(filepath.Join("d", string(rune('a'+i%26))+string(rune('a'+i/26))), 0o644, text(i, 10)))
	}
	ix, data := build(t, tarOf(t, ents...))
	f, mnt := mount(t, ix, &memSource{data: data}, openCache(t, t.TempDir(), 0), layerfs.Options{})

	names := func() []string {
		es, err := os.ReadDir(filepath.Join(mnt, "d"))
		if err != nil {
			t.Fatal(err)
		}
		var ns []string
		for _, e := range es {
			ns = append(ns, e.Name())
		}
		return ns
	}
	first := names()
	if len(first) != 300 {
		t.Fatalf("listed %d entries, want 300", len(first))
	}
	before := f.Stats().DirListings
	for range 3 {
		if again := names(); !slices.Equal(again, first) {
			t.Fatalf("a listing from the kernel's cache differs: %d entries", len(again))
		}
	}
	if n := f.Stats().DirListings - before; n != 0 {
		t.Errorf("listing a directory again reached the file system %d times, want 0 (FOPEN_CACHE_DIR)", n)
	}

	for _, e := range first[:20] {
		readFile(t, filepath.Join(mnt, "d", e))
	}
	if n := f.Stats().Flushes; n != 1 {
		t.Errorf("%d FLUSH requests for 20 closes, want 1 (ENOSYS, then none)", n)
	}
}
