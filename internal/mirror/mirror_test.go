package mirror_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/mirror"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// upstream is strata's registry on a real socket, as a plain OCI registry,
// counting the requests it serves; blobDelay slows blob GETs.
type upstream struct {
	srv       *httptest.Server
	base      string
	host      string
	blobGets  atomic.Int32
	manifests atomic.Int32
	blobDelay time.Duration
}

func newUpstream(t *testing.T) *upstream {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(st, registry.Options{})
	u := &upstream{}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "GET" && strings.Contains(r.URL.Path, "/blobs/") {
			u.blobGets.Add(1)
			time.Sleep(u.blobDelay)
		}
		if r.Method == "GET" && strings.Contains(r.URL.Path, "/manifests/") {
			u.manifests.Add(1)
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.srv.Close)
	u.base, u.host = u.srv.URL, u.srv.Listener.Addr().String()
	return u
}

// mirrorOf starts strata's registry as a mirror of up, with expansion.
func mirrorOf(t *testing.T, up *upstream, ttl time.Duration) (base string, st *store.Store) {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var mir *mirror.Mirror
	svc, err := expand.New(st, expand.Options{Fetching: func(repo string, d digest.Digest) bool { return mir.Fetching(repo, d) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	client := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback), Retry: remote.RetryPolicy{Attempts: 1, MaxElapsed: 2 * time.Second}, Timeout: 2 * time.Second})
	mir = mirror.New(mirror.Options{Store: st, Client: client, Registry: up.host, TTL: ttl, OnManifest: svc.OnManifest})
	reg := registry.New(st, registry.Options{Upstream: mir})
	reg.Extension(api.Extension, svc.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
	srv := httptest.NewServer(reg)
	t.Cleanup(func() { srv.Close(); mir.Close(); cancel(); <-done })
	return srv.URL, st
}

func req(t *testing.T, method, url, contentType string, body []byte) (int, []byte, http.Header) {
	t.Helper()
	r, _ := http.NewRequest(method, url, bytes.NewReader(body))
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
		r.Header.Set("Accept", contentType)
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header
}

// pushImage pushes a one-layer image to base's repo:tag; content varies
// with tag.
func pushImage(t *testing.T, base, repo, tag string) (manifest, layer digest.Digest) {
	t.Helper()
	tarball, err := ocilayout.Tar([]ocilayout.Entry{{Name: "etc/", Type: '5'}, {Name: "etc/hello", Content: bytes.Repeat([]byte("hello "+tag+"\n"), 3000)}})
	if err != nil {
		t.Fatal(err)
	}
	l := ocilayout.GzipLayer(tarball)
	cfg, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{l.DiffID}}})
	for _, b := range [][]byte{l.Blob, cfg} {
		if code, body, _ := req(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+digest.FromBytes(b).String(), "", b); code != http.StatusCreated {
			t.Fatalf("push blob: %d %s", code, body)
		}
	}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
		Layers: []ocispec.Descriptor{{MediaType: l.MediaType, Digest: digest.FromBytes(l.Blob), Size: int64(len(l.Blob))}}}
	man.SchemaVersion = 2
	mb, _ := json.Marshal(man)
	if code, body, _ := req(t, "PUT", base+"/v2/"+repo+"/manifests/"+tag, ocispec.MediaTypeImageManifest, mb); code != http.StatusCreated {
		t.Fatalf("push manifest: %d %s", code, body)
	}
	return digest.FromBytes(mb), digest.FromBytes(l.Blob)
}

// TestMirror: a manifest and blob asked for the first time come from the
// upstream, verified, and later ones from the store; concurrent first
// requests for a blob fetch it once; the layers are expanded (layer
// mounts), a mount asked while the layer is still on its way is 202;
// writes are refused; with the upstream down, stored tags and blobs are
// still served and unknown ones are 503.
func TestMirror(t *testing.T) {
	up := newUpstream(t)
	md, layer := pushImage(t, up.base, "library/app", "v1")
	up.blobDelay = 300 * time.Millisecond
	base, _ := mirrorOf(t, up, time.Hour)

	code, body, h := req(t, "GET", base+"/v2/library/app/manifests/v1", ocispec.MediaTypeImageManifest, nil)
	if code != http.StatusOK || h.Get("Docker-Content-Digest") != md.String() || digest.FromBytes(body) != md {
		t.Fatalf("manifest through the mirror: %d %s", code, h.Get("Docker-Content-Digest"))
	}
	// The layer is on its way: a layer-mount request waits, 202.
	code, _, h = req(t, "POST", base+api.MountPath("library/app", layer), "", nil)
	if code != http.StatusAccepted || h.Get("Retry-After") == "" {
		t.Errorf("layer mount while the mirror fetches the layer: %d, want 202 with Retry-After", code)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if code, body, _ := req(t, "GET", base+"/v2/library/app/blobs/"+layer.String(), "", nil); code != http.StatusOK || digest.FromBytes(body) != layer {
				t.Errorf("blob through the mirror: %d", code)
			}
		}()
	}
	wg.Wait()
	up.blobDelay = 0
	// Config and layer: one GET each, however many asked.
	if n := up.blobGets.Load(); n != 2 {
		t.Errorf("upstream served %d blob GETs, want 2 (config and layer, once each)", n)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		code, _, _ = req(t, "POST", base+api.MountPath("library/app", layer), "", nil)
		if code == http.StatusOK {
			break
		}
		if code != http.StatusAccepted || time.Now().After(deadline) {
			t.Fatalf("layer mount: %d, want 200 once expanded", code)
		}
	}
	manifests := up.manifests.Load()
	req(t, "GET", base+"/v2/library/app/manifests/v1", ocispec.MediaTypeImageManifest, nil)
	req(t, "GET", base+"/v2/library/app/manifests/"+md.String(), ocispec.MediaTypeImageManifest, nil)
	if n := up.manifests.Load() - manifests; n != 0 {
		t.Errorf("a stored manifest within its TTL cost %d upstream requests", n)
	}

	for _, w := range []struct{ method, path string }{
		{"PUT", "/v2/library/app/manifests/v2"},
		{"POST", "/v2/library/app/blobs/uploads/"},
		{"DELETE", "/v2/library/app/manifests/" + md.String()},
	} {
		if code, _, _ := req(t, w.method, base+w.path, "", nil); code != http.StatusMethodNotAllowed {
			t.Errorf("%s %s on a mirror: %d, want 405", w.method, w.path, code)
		}
	}

	up.srv.Close()
	if code, _, _ := req(t, "GET", base+"/v2/library/app/blobs/"+layer.String(), "", nil); code != http.StatusOK {
		t.Errorf("stored blob with the upstream down: %d", code)
	}
	if code, _, _ := req(t, "GET", base+"/v2/library/app/manifests/"+md.String(), ocispec.MediaTypeImageManifest, nil); code != http.StatusOK {
		t.Errorf("stored manifest with the upstream down: %d", code)
	}
	if code, _, _ := req(t, "GET", base+"/v2/library/app/manifests/v9", ocispec.MediaTypeImageManifest, nil); code != http.StatusServiceUnavailable {
		t.Errorf("unknown tag with the upstream down: %d, want 503", code)
	}
}

// TestMirrorTTL: a tag is checked against the upstream again once its TTL
// has passed (a moved tag is followed), and served from the store when the
// upstream is down.
func TestMirrorTTL(t *testing.T) {
	up := newUpstream(t)
	md1, _ := pushImage(t, up.base, "app", "v1")
	base, _ := mirrorOf(t, up, 200*time.Millisecond)
	get := func() string {
		code, _, h := req(t, "GET", base+"/v2/app/manifests/latest-v", ocispec.MediaTypeImageManifest, nil)
		if code != http.StatusOK {
			t.Fatalf("manifest: %d", code)
		}
		return h.Get("Docker-Content-Digest")
	}
	// latest-v points at v1, then at v2.
	b1, _ := get1(t, up.base, "app", md1.String())
	req(t, "PUT", up.base+"/v2/app/manifests/latest-v", ocispec.MediaTypeImageManifest, b1)
	if d := get(); d != md1.String() {
		t.Fatalf("tag is %s, want %s", d, md1)
	}
	md2, _ := pushImage(t, up.base, "app", "v2")
	b2, _ := get1(t, up.base, "app", md2.String())
	req(t, "PUT", up.base+"/v2/app/manifests/latest-v", ocispec.MediaTypeImageManifest, b2)
	if d := get(); d != md1.String() {
		t.Errorf("within the TTL the tag is %s, want the stored %s", d, md1)
	}
	time.Sleep(300 * time.Millisecond)
	if d := get(); d != md2.String() {
		t.Errorf("after the TTL the tag is %s, want the upstream's %s", d, md2)
	}
	up.srv.Close()
	time.Sleep(300 * time.Millisecond)
	if d := get(); d != md2.String() {
		t.Errorf("upstream down: the tag is %s, want the stored %s", d, md2)
	}
}

func get1(t *testing.T, base, repo, ref string) ([]byte, error) {
	t.Helper()
	code, b, _ := req(t, "GET", base+"/v2/"+repo+"/manifests/"+ref, ocispec.MediaTypeImageManifest, nil)
	if code != http.StatusOK {
		return nil, fmt.Errorf("GET manifest %s: %d", ref, code)
	}
	return b, nil
}
