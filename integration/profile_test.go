package integration

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
)

// settledBytesServed waits until the registry's blob bytes stop growing
// (a node's background fetches end after its container) and returns them.
func settledBytesServed(t *testing.T, reg *registryProc) int64 {
	t.Helper()
	last := blobBytesServed(t, reg)
	for i := 0; i < 50; i++ {
		time.Sleep(200 * time.Millisecond)
		n := blobBytesServed(t, reg)
		if n == last {
			return n
		}
		last = n
	}
	return last
}

// TestStartupProfile: the first node to start an image records what it
// read and stores it in the registry; another node starting the image cold
// prefetches exactly that, fetching less than a node without the profile.
func TestStartupProfile(t *testing.T) {
	requireRun(t)
	layout, _, _ := debianPython(t)
	reg := startRegistry(t)
	ref := reg.Addr + "/debian/python:latest"
	pushLayout(t, layout, "latest", ref)

	resp, err := http.Head("http://" + reg.Addr + "/v2/debian/python/manifests/latest")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	m := digest.Digest(resp.Header.Get("Docker-Content-Digest"))
	profileURL := "http://" + reg.Addr + api.ProfilePath("debian/python", m)
	var startOn func(root string, flags ...string) int64
	getProfile := func() (*api.Profile, int) {
		resp, err := http.Get(profileURL)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var p api.Profile
		if resp.StatusCode == 200 {
			if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
				t.Fatal(err)
			}
		}
		return &p, resp.StatusCode
	}

	var root string
	start := func(flags ...string) int64 {
		t.Helper()
		root = nodeRoot(t)
		return startOn(root, flags...)
	}
	startOn = func(root string, flags ...string) int64 {
		t.Helper()
		before := settledBytesServed(t, reg)
		args := append(flags, "run", "--rm", "--plain-http", ref, "python3", "-c", `print("hello")`)
		if out := strata(t, root, args...); out != "hello\n" {
			t.Fatalf("run: %q", out)
		}
		return settledBytesServed(t, reg) - before
	}

	without := start("--startup-profiles", "off")
	if _, code := getProfile(); code != http.StatusNotFound {
		t.Fatalf("a node with profiles off stored one (GET %d)", code)
	}
	recording := start() // auto: records and stores
	var p *api.Profile
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var code int
		if p, code = getProfile(); code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no profile stored after the first start (GET %d)", code)
		}
	}
	pl := p.Layers[0]
	if len(p.Layers) != 1 || len(pl.Frames) == 0 || len(pl.Ranges) != len(pl.Frames) || len(pl.Ranks) != len(pl.Frames) {
		t.Fatalf("profile %+v", p)
	}
	var profiled int64
	for _, r := range pl.Ranges {
		profiled += r[1]
	}
	// The registry packed the pages the start read: fewer bytes than
	// the frames holding them.
	if p.Pack == nil || len(pl.Pages) == 0 || len(pl.PageRanks) != len(pl.Pages) {
		t.Fatalf("no start-up pack: %d page ranges, pack %+v", len(pl.Pages), p.Pack)
	}
	var pages int64
	for _, r := range pl.Pages {
		pages += r[1]
	}
	if p.Pack.Size >= profiled {
		t.Errorf("the pack is %d bytes, not less than the %d of the frames", p.Pack.Size, profiled)
	}
	with := start("--startup-profiles", "use")
	t.Logf("bytes fetched: without a profile %d, recording one %d, with it %d (%d frames, %d bytes; pack of %d bytes of pages in %d bytes)",
		without, recording, with, len(pl.Frames), profiled, pages, p.Pack.Size)
	if with >= without {
		t.Errorf("a node with the profile fetched %d bytes, not less than %d without", with, without)
	}
	// The pack is fetched once, ahead (the index, manifest and config are
	// the rest), and the reads take their pages from it, fetching no
	// frames.
	if limit := p.Pack.Size + 1<<20; with > limit {
		t.Errorf("a node with the profile fetched %d bytes, more than %d (the pack's %d bytes and 1 MiB)", with, limit, p.Pack.Size)
	}
	// Another container on that node has the pack's pages there.
	if again := startOn(root, "--startup-profiles", "use"); again > 64<<10 {
		t.Errorf("a second start on the node fetched %d bytes", again)
	}
}
