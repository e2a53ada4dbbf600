package integration

import (
	"archive/tar"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestDerivedProfile: version 2 of an image (its base layers unchanged, a
// new top layer) has no start-up profile of its own; the registry answers
// with version 1's (derived), so v2's first start prefetches what v1's
// start read of the shared layers, and records v2's own profile.
func TestDerivedProfile(t *testing.T) {
	requireRun(t)
	testenv.RequireRoot(t)
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "test needs a static /bin/busybox (busybox-static): "+err.Error())
	}
	base, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Mode: 0o755, Content: bb},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
	})
	if err != nil {
		t.Fatal(err)
	}
	filler := make([]byte, 8<<20)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range filler {
		filler[i] = byte(r.Uint32())
	}
	data, err := ocilayout.Tar([]ocilayout.Entry{{Name: "data/", Type: tar.TypeDir}, {Name: "data/filler", Content: filler}})
	if err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(t.TempDir(), "oci")
	for _, v := range []string{"1", "2"} {
		top, err := ocilayout.Tar([]ocilayout.Entry{{Name: "app/", Type: tar.TypeDir}, {Name: "app/version", Content: []byte("version " + v + "\n")}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ocilayout.Write(layout, v, ocilayout.Image{
			Layers: []ocilayout.Layer{ocilayout.GzipLayer(base), ocilayout.GzipLayer(data), ocilayout.GzipLayer(top)},
			Config: ocispec.ImageConfig{Env: []string{"PATH=/bin"}, Cmd: []string{"/bin/busybox", "sh", "-c", "busybox cat /app/version; busybox md5sum /data/filler >/dev/null"}},
		}); err != nil {
			t.Fatal(err)
		}
	}
	reg := startRegistry(t)
	refs := map[string]string{}
	profileOf := func(v string) (*api.Profile, int) {
		resp, err := http.Head("http://" + reg.Addr + "/v2/app/manifests/" + v)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		m := digest.Digest(resp.Header.Get("Docker-Content-Digest"))
		resp, err = http.Get("http://" + reg.Addr + api.ProfilePath("app", m))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var p api.Profile
		if resp.StatusCode == 200 {
			json.NewDecoder(resp.Body).Decode(&p)
		}
		return &p, resp.StatusCode
	}
	waitOwn := func(v string) *api.Profile {
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if p, code := profileOf(v); code == 200 && !p.Derived {
				return p
			}
			if time.Now().After(deadline) {
				t.Fatalf("no profile of v%s stored after its first start", v)
			}
		}
	}
	run := func(v string) int64 {
		before := settledBytesServed(t, reg)
		if out := strata(t, nodeRoot(t), "run", "--rm", "--plain-http", refs[v]); out != "version "+v+"\n" {
			t.Fatalf("run v%s: %q", v, out)
		}
		return settledBytesServed(t, reg) - before
	}
	for _, v := range []string{"1", "2"} {
		refs[v] = reg.Addr + "/app:" + v
		pushLayout(t, layout, v, refs[v])
	}
	if _, code := profileOf("2"); code != http.StatusNotFound {
		t.Fatalf("v2 has a profile before any start: %d", code)
	}
	first1 := run("1")
	p1 := waitOwn("1")
	profiled1 := run("1")
	d, code := profileOf("2")
	if code != 200 || !d.Derived || d.Pack == nil || d.Pack.Digest != p1.Pack.Digest {
		t.Fatalf("v2's profile before its first start: %d %+v; want v1's, derived", code, d)
	}
	first2 := run("2")
	p2 := waitOwn("2")
	t.Logf("bytes served: v1 first start %d, v1 profiled %d, v2 first start (derived profile) %d; v2's own profile lists %d layers", first1, profiled1, first2, len(p2.Layers))
	if len(p2.Layers) < 2 {
		t.Errorf("v2's recorded profile has %d layers, want the shared data layer and its own", len(p2.Layers))
	}
}
