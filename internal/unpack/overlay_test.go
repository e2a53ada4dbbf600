package unpack_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/unpack"
)

// TestOverlay stacks two unpacked layers as overlayfs lowers and checks
// that the top layer's whiteouts and opaque directories hide the bottom
// layer's files the way the OCI image spec says.
func TestOverlay(t *testing.T) {
	testenv.RequireRoot(t)
	tmp := t.TempDir()
	mk := func(name string) string {
		p := filepath.Join(tmp, name)
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bottom, top, upper, work, merged := mk("bottom"), mk("top"), mk("upper"), mk("work"), mk("merged")
	layers := map[string][]entry{
		bottom: {
			dir("a/"), file("a/gone", "1"), file("a/stays", "2"),
			dir("b/"), file("b/hidden", "3"), dir("b/sub/"), file("b/sub/deep", "4"),
			dir("c/"), file("c/x", "5"),
			file("keep", "6"),
			dir("d/"), file("d/lower", "7"),
		},
		top: {
			file("a/.wh.gone", ""),
			dir("b/"), file("b/.wh..wh..opq", ""), file("b/new", "8"),
			file(".wh.c", ""),
			// The layer both whites out d and brings its own d.
			file(".wh.d", ""), dir("d/"), file("d/upper", "9"),
		},
	}
	for dir, es := range layers {
		if _, err := unpack.Layer(context.Background(), bytes.NewReader(gzipOf(t, tarOf(t, es...))), dir, unpack.Options{}); err != nil {
			t.Fatalf("unpack %s: %v", filepath.Base(dir), err)
		}
	}
	opts := "lowerdir=" + top + ":" + bottom + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		testenv.Unavailable(t, "overlayfs mount failed: "+err.Error())
	}
	t.Cleanup(func() { unix.Unmount(merged, unix.MNT_DETACH) })

	var got []string
	err := filepath.WalkDir(merged, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(merged, p)
		if rel != "." {
			got = append(got, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(got)
	want := []string{"a", "a/stays", "b", "b/new", "d", "d/upper", "keep"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("merged tree (-want +got):\n%s", diff)
	}
	for _, p := range []string{"a/gone", "b/hidden", "b/sub", "c", "d/lower"} {
		if _, err := os.Lstat(filepath.Join(merged, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is visible in the union (%v)", p, err)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(merged, "a/stays")); string(b) != "2" {
		t.Errorf("a/stays holds %q", b)
	}
}
