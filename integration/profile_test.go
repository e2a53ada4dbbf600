package integration

import (
	"encoding/json"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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
	if p.Pack == nil || len(p.Pack.Spans) == 0 || pl.Pages != nil {
		t.Fatalf("no start-up pack, or the page list stored beside it: %d page ranges, pack %v", len(pl.Pages), p.Pack != nil)
	}
	var pages int64
	for _, s := range p.Pack.Spans {
		pages += s[2]
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

	// A pack whose bytes do not match its table is not served: the node
	// drops it and reads the frames.
	var packFile string
	filepath.WalkDir(reg.Root, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() == p.Pack.Digest.Encoded() && strings.Contains(path, "blobs") {
			packFile = path
		}
		return nil
	})
	b, err := os.ReadFile(packFile)
	if err != nil {
		t.Fatalf("the pack blob in the registry's store: %v", err)
	}
	for i := len(b) / 3; i < len(b); i += 4096 {
		b[i] ^= 0xff
	}
	if err := os.WriteFile(packFile, b, 0o644); err != nil {
		t.Fatal(err)
	}
	croot := nodeRoot(t)
	corrupt := startOn(croot, "--startup-profiles", "use")
	t.Logf("with a corrupt pack: %d bytes fetched", corrupt)
	if log, _ := os.ReadFile(filepath.Join(croot, "daemon.log")); !strings.Contains(string(log), "start-up pack failed") {
		t.Errorf("the node did not notice the corrupt pack; its log:\n%s", tail(string(log), 3000))
	}
}
