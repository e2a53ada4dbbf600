package overlay_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/internal/overlay"
	"github.com/strata-oci/strata/internal/testenv"
)

func TestPlan(t *testing.T) {
	tests := []struct {
		name string
		spec overlay.Spec
		want overlay.Mount
		err  bool
	}{
		{"no layers", overlay.Spec{}, overlay.Mount{}, true},
		{"single read-only layer is a bind", overlay.Spec{Lowers: []string{"/l/1"}}, overlay.Mount{Type: "bind", Source: "/l/1", ReadOnly: true}, false},
		{"read-only union", overlay.Spec{Lowers: []string{"/l/2", "/l/1"}}, overlay.Mount{Type: "overlay", Source: "overlay", Lowers: []string{"/l/2", "/l/1"}, Options: []string{"index=off", "redirect_dir=off", "metacopy=off"}, ReadOnly: true}, false},
		{"container union", overlay.Spec{Lowers: []string{"/l/1"}, Upper: "/c/u", Work: "/c/w"}, overlay.Mount{Type: "overlay", Source: "overlay", Lowers: []string{"/l/1"}, Options: []string{"upperdir=/c/u", "workdir=/c/w", "index=off", "redirect_dir=off", "metacopy=off"}}, false},
		{"upper without work", overlay.Spec{Lowers: []string{"/l/1"}, Upper: "/c/u"}, overlay.Mount{}, true},
		{"colon in path", overlay.Spec{Lowers: []string{"/l/a:b", "/l/c"}}, overlay.Mount{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := overlay.Plan(tc.spec)
			if tc.err {
				if !errors.Is(err, overlay.ErrInvalid) {
					t.Fatalf("err = %v, want ErrInvalid", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Fatalf("plan (-want +got):\n%s", d)
			}
		})
	}
	m, _ := overlay.Plan(overlay.Spec{Lowers: []string{"/a", "/b"}, Upper: "/u", Work: "/w"})
	if got := m.Data(); got != "lowerdir=/a:/b,upperdir=/u,workdir=/w,index=off,redirect_dir=off,metacopy=off" {
		t.Fatalf("data = %q", got)
	}
}

// TestManyLayers mounts a union of 150 layers (more than mount(2)'s
// page-size option limit allows with these paths) and checks that the top
// layer wins, lower files show through and writes go to the upper dir.
func TestManyLayers(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	var lowers []string
	const n = 150
	for i := n - 1; i >= 0; i-- { // top first
		l := filepath.Join(dir, "layers", fmt.Sprintf("a-fairly-long-layer-directory-name-%03d", i))
		os.MkdirAll(l, 0o755)
		os.WriteFile(filepath.Join(l, fmt.Sprintf("f%03d", i)), []byte(fmt.Sprint(i)), 0o644)
		os.WriteFile(filepath.Join(l, "who"), []byte(fmt.Sprint(i)), 0o644)
		lowers = append(lowers, l)
	}
	upper, work, target := filepath.Join(dir, "u"), filepath.Join(dir, "w"), filepath.Join(dir, "m")
	for _, d := range []string{upper, work, target} {
		os.MkdirAll(d, 0o755)
	}
	m, err := overlay.Plan(overlay.Spec{Lowers: lowers, Upper: upper, Work: work})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Data()) < os.Getpagesize() {
		t.Fatalf("test needs option data over a page, has %d bytes", len(m.Data()))
	}
	if err := m.Do(target); err != nil {
		testenv.Unavailable(t, "overlayfs mount: "+err.Error())
	}
	t.Cleanup(func() { overlay.Unmount(target, true) })
	if b, _ := os.ReadFile(filepath.Join(target, "who")); string(b) != fmt.Sprint(n-1) {
		t.Fatalf("who = %q, want the top layer's %d", b, n-1)
	}
	if b, _ := os.ReadFile(filepath.Join(target, "f000")); string(b) != "0" {
		t.Fatalf("bottom layer file = %q", b)
	}
	ents, _ := os.ReadDir(target)
	if len(ents) != n+1 {
		t.Fatalf("%d entries, want %d", len(ents), n+1)
	}
	if err := os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(upper, "new")); err != nil {
		t.Fatalf("write did not land in upper: %v", err)
	}
	if err := overlay.Unmount(target, false); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), target) {
		t.Fatal("mount left behind")
	}
}
