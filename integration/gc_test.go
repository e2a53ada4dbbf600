package integration

import (
	"context"
	"io/fs"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/testenv"
)

// TestRegistryGC: two images pushed with skopeo (sharing their base layer)
// and started lazily; one deleted with skopeo; `strata registry gc`, run
// beside the serving registry, frees its own layer and expansion (what it
// reports is what left blobs/), and the other image still starts lazily.
// Before, deleting an image freed nothing.
func TestRegistryGC(t *testing.T) {
	requireRun(t)
	testenv.RequireRoot(t)
	layout, _ := busyboxLayout(t)
	reg := startRegistry(t)
	for _, tag := range []string{"pause", "hello"} {
		pushLayout(t, layout, tag, reg.Addr+"/gc/"+tag+":1")
	}
	root := nodeRoot(t)
	// (No start-up profile: its upload, seconds after the run, would
	// change blobs/ under the dry run's check below.)
	if out, errOut, code := strataCode(t, root, "--startup-profiles", "off", "run", "--rm", "--plain-http", reg.Addr+"/gc/hello:1"); code != 0 || out != "hello from a layer\n" {
		t.Fatalf("run hello: %d %q %s", code, out, errOut)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	run(t, ctx, "skopeo", "delete", "--tls-verify=false", "docker://"+reg.Addr+"/gc/hello:1")
	blobs := func() int64 {
		var n int64
		filepath.WalkDir(filepath.Join(reg.Root, "blobs"), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				fi, _ := d.Info()
				n += fi.Size()
			}
			return nil
		})
		return n
	}
	before := blobs()
	gc := func(args ...string) string {
		out, err := exec.Command(strataBin, append([]string{"registry", "gc", "--root", reg.Root, "--grace", "1ns"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("strata registry gc %v: %v\n%s", args, err, out)
		}
		t.Logf("gc %v: %s", args, out)
		return string(out)
	}
	if out := gc("--dry-run"); !strings.Contains(out, "would remove") || blobs() != before {
		t.Fatalf("dry run: %s (blobs/ %d → %d bytes)", out, before, blobs())
	}
	gc()
	freed := before - blobs()
	// hello's own layer is 16 MiB of random bytes: it and its expansion
	// data blob go.
	if freed < 30<<20 {
		t.Errorf("gc freed %d bytes of blobs, want hello's layer and its expansion (> 30 MiB)", freed)
	}
	// pause still starts, lazily, from a fresh node.
	if out, errOut, code := strataCode(t, nodeRoot(t), "--startup-profiles", "off", "run", "--rm", "--plain-http", reg.Addr+"/gc/pause:1", "/bin/busybox", "echo", "still here"); code != 0 || out != "still here\n" {
		t.Fatalf("run pause after gc: %d %q %s", code, out, errOut)
	}
}

// TestNodeRmiFrees: after a lazy run (its layers still mounted, lingering
// for a next start), `strata rmi` of the image unmounts and frees its
// layers and the cache items only they named, as `strata df` shows.
// (internal/node TestRemoveImageFrees covers unpacked layers and gc.)
func TestNodeRmiFrees(t *testing.T) {
	requireRun(t)
	testenv.RequireRoot(t)
	layout, _ := busyboxLayout(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/gc/hello:1"
	pushLayout(t, layout, "hello", ref)
	root := nodeRoot(t)
	if out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref, "/bin/busybox", "md5sum", "/data/filler"); code != 0 || !strings.Contains(out, "/data/filler") {
		t.Fatalf("run: %d %q %s", code, out, errOut)
	}
	before := strata(t, root, "df")
	out := strata(t, root, "rmi", ref)
	t.Logf("df before:\n%s\nrmi: %s", before, out)
	if !strings.Contains(out, "freed 2 layers") {
		t.Errorf("rmi: %q, want its 2 layers freed", out)
	}
	after := strata(t, root, "df")
	t.Logf("df after:\n%s", after)
	if strings.Contains(after, "lazy") {
		t.Errorf("layers left after rmi:\n%s", after)
	}
	if !strings.Contains(after, "cache: 0B in 0 items") {
		t.Errorf("cache items left after rmi:\n%s", after)
	}
}
