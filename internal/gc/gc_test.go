package gc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/gc"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

type env struct {
	t    *testing.T
	root string
	url  string
	st   *store.Store
	ex   *expand.Service
}

func newEnv(t *testing.T) *env {
	root := t.TempDir()
	st, err := store.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	ex, err := expand.New(st, expand.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ex.Run(ctx); close(done) }()
	reg := registry.New(st, registry.Options{OnManifest: ex.OnManifest})
	reg.Extension(api.Extension, ex.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
	srv := httptest.NewServer(reg)
	t.Cleanup(func() { srv.Close(); cancel(); <-done })
	return &env{t: t, root: root, url: srv.URL, st: st, ex: ex}
}

func (e *env) req(method, path string, body []byte, hdr ...string) (int, []byte) {
	e.t.Helper()
	r, _ := http.NewRequest(method, e.url+path, bytes.NewReader(body))
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func (e *env) blob(repo string, b []byte) digest.Digest {
	e.t.Helper()
	d := digest.FromBytes(b)
	if code, body := e.req("POST", "/v2/"+repo+"/blobs/uploads/?digest="+d.String(), b); code != 201 {
		e.t.Fatalf("push blob: %d %s", code, body)
	}
	return d
}

// image pushes an image of the given files (one layer each) to repo:tag,
// waits for its expansion, and returns its manifest and layers.
func (e *env) image(repo, tag string, files ...string) (digest.Digest, []digest.Digest) {
	e.t.Helper()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}, Config: ocispec.ImageConfig{Cmd: []string{tag}}}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	m.SchemaVersion = 2
	var layers []digest.Digest
	for _, f := range files {
		tr, err := ocilayout.Tar([]ocilayout.Entry{{Name: f, Content: bytes.Repeat([]byte(f), 50000)}})
		if err != nil {
			e.t.Fatal(err)
		}
		l := ocilayout.GzipLayer(tr)
		d := e.blob(repo, l.Blob)
		layers = append(layers, d)
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: d, Size: int64(len(l.Blob))})
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
	}
	cb, _ := json.Marshal(cfg)
	m.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: e.blob(repo, cb), Size: int64(len(cb))}
	mb, _ := json.Marshal(m)
	if code, body := e.req("PUT", "/v2/"+repo+"/manifests/"+tag, mb, "Content-Type", ocispec.MediaTypeImageManifest); code != 201 {
		e.t.Fatalf("push manifest: %d %s", code, body)
	}
	for _, l := range layers {
		e.mount(repo, l)
	}
	// The expansion artifact is published once all layers are done.
	md := digest.FromBytes(mb)
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := e.req("GET", "/v2/"+repo+"/referrers/"+md.String(), nil)
		var idx ocispec.Index
		if code == 200 && json.Unmarshal(body, &idx) == nil && len(idx.Manifests) > 0 {
			break
		}
		if time.Now().After(deadline) {
			e.t.Fatal("no expansion artifact")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return md, layers
}

// mount asks for layer's mount until it is expanded.
func (e *env) mount(repo string, layer digest.Digest) api.MountDescriptor {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := e.req("POST", api.MountPath(repo, layer), nil)
		if code == 200 {
			var md api.MountDescriptor
			json.Unmarshal(body, &md)
			return md
		}
		if code != http.StatusAccepted || time.Now().After(deadline) {
			e.t.Fatalf("mount %s: %d %s", layer, code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// age makes everything in the root look written two hours ago.
func (e *env) age() {
	old := time.Now().Add(-2 * time.Hour)
	filepath.WalkDir(e.root, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			os.Chtimes(p, old, old)
		}
		return nil
	})
}

func (e *env) collect(opts gc.Options) *gc.Report {
	e.t.Helper()
	rep, err := gc.Collect(context.Background(), e.st, e.ex, opts)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Log(rep)
	return rep
}

func (e *env) blobsSize() int64 {
	var n int64
	filepath.WalkDir(filepath.Join(e.root, "blobs"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			fi, _ := d.Info()
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestCollect: of two images sharing a layer, one deleted: the collection
// frees its own layer, config, manifest, expansion (index and data blobs,
// records), expansion artifact and start-up profile with its pack, and
// keeps everything of the other, which still pulls and mounts. A dry run
// reports the same and removes nothing; a second collection finds nothing.
// Before, deleting an image freed nothing.
func TestCollect(t *testing.T) {
	e := newEnv(t)
	a, aLayers := e.image("app", "a", "shared", "only-a")
	b, bLayers := e.image("app", "b", "shared", "only-b")
	mdA := e.mount("app", aLayers[1])
	// A profile with a pack for a.
	prof, _ := json.Marshal(api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: aLayers[1], Data: mdA.Data.Digest, Frames: []int{0}, Pages: [][2]int64{{0, 100}}}}})
	if code, body := e.req("PUT", api.ProfilePath("app", a), prof, "Content-Type", "application/json"); code != 201 {
		t.Fatalf("profile: %d %s", code, body)
	}
	code, body := e.req("GET", api.ProfilePath("app", a), nil)
	var p api.Profile
	if code != 200 || json.Unmarshal(body, &p) != nil || p.Pack == nil {
		t.Fatalf("profile: %d %s", code, body)
	}
	if code, body := e.req("DELETE", "/v2/app/manifests/"+a.String(), nil); code != 202 {
		t.Fatalf("delete a: %d %s", code, body)
	}
	before := e.blobsSize()

	// Everything young: nothing goes.
	if rep := e.collect(gc.Options{}); rep.Blobs != 0 || rep.Manifests != 0 || rep.Kept == 0 {
		t.Fatalf("young content collected: %+v", rep)
	}
	e.age()
	dry := e.collect(gc.Options{DryRun: true})
	if e.blobsSize() != before {
		t.Fatal("a dry run removed blobs")
	}
	rep := e.collect(gc.Options{})
	if rep.Blobs != dry.Blobs || rep.BlobBytes != dry.BlobBytes || rep.Manifests != dry.Manifests {
		t.Errorf("dry run said %d blobs (%d bytes), %d manifests; the collection removed %d (%d), %d", dry.Blobs, dry.BlobBytes, dry.Manifests, rep.Blobs, rep.BlobBytes, rep.Manifests)
	}
	// a's layer, its config, manifest, expansion index and data, the
	// profile blob and pack and the expansion and profile artifacts, the
	// profile artifact's empty config is shared.
	if rep.Blobs < 8 || rep.Manifests < 2 || rep.Expansions < 1 || rep.Profiles != 1 {
		t.Errorf("removed %+v; want a's blobs, its artifacts, its layer's expansion and its profile", rep)
	}
	if after := e.blobsSize(); before-after != rep.BlobBytes {
		t.Errorf("blobs/ shrank by %d bytes, the report says %d", before-after, rep.BlobBytes)
	}
	for _, d := range []digest.Digest{aLayers[1], mdA.Index.Digest, mdA.Data.Digest, p.Pack.Digest} {
		if e.st.HasBlob(d) {
			t.Errorf("blob %s of the deleted image kept", d)
		}
	}
	// b is whole: pulls, mounts, its expansion blobs are there.
	code, mb := e.req("GET", "/v2/app/manifests/b", nil, "Accept", ocispec.MediaTypeImageManifest)
	var m ocispec.Manifest
	if code != 200 || json.Unmarshal(mb, &m) != nil || digest.FromBytes(mb) != b {
		t.Fatalf("b after the collection: %d", code)
	}
	for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		if code, _ := e.req("GET", "/v2/app/blobs/"+d.Digest.String(), nil); code != 200 {
			t.Errorf("blob %s of b: %d", d.Digest, code)
		}
	}
	for _, l := range bLayers {
		md := e.mount("app", l)
		for _, d := range []digest.Digest{md.Index.Digest, md.Data.Digest} {
			if code, _ := e.req("GET", "/v2/app/blobs/"+d.String(), nil); code != 200 {
				t.Errorf("expansion blob %s of b's layer %s: %d", d, l, code)
			}
		}
	}
	if code, body := e.req("GET", "/v2/app/referrers/"+b.String(), nil); code != 200 || !bytes.Contains(body, []byte(api.ArtifactTypeExpansion)) {
		t.Errorf("b's expansion artifact: %d %s", code, body)
	}
	if again := e.collect(gc.Options{}); again.Blobs != 0 || again.Manifests != 0 || again.Links != 0 {
		t.Errorf("a second collection removed %+v", again)
	}
}

// TestCollectBesidePushes: what a push in progress needs is kept although
// no manifest names it yet: a blob uploaded during the collection (young),
// and an old blob that a client just asked about with HEAD, about to name
// it in a manifest.
func TestCollectBesidePushes(t *testing.T) {
	e := newEnv(t)
	orphan := e.blob("app", []byte("pushed long ago, no manifest yet"))
	headed := e.blob("app", []byte("pushed long ago, asked about now"))
	e.age()
	fresh := e.blob("app", []byte("pushed now"))
	if code, _ := e.req("HEAD", "/v2/app/blobs/"+headed.String(), nil); code != 200 {
		t.Fatalf("HEAD: %d", code)
	}
	rep := e.collect(gc.Options{})
	if e.st.HasBlob(orphan) || rep.Blobs != 1 || rep.Links != 1 {
		t.Errorf("the old orphan blob: kept %v, report %+v", e.st.HasBlob(orphan), rep)
	}
	for _, d := range []digest.Digest{fresh, headed} {
		if code, _ := e.req("HEAD", "/v2/app/blobs/"+d.String(), nil); code != 200 {
			t.Errorf("blob %s of a push in progress: %d", d, code)
		}
	}
	// The push goes on: a manifest naming them.
	cfg := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":32},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":%q,"size":10}]}`, ocispec.MediaTypeImageManifest, headed, fresh)
	if code, body := e.req("PUT", "/v2/app/manifests/v1", []byte(cfg), "Content-Type", ocispec.MediaTypeImageManifest); code != 201 {
		t.Errorf("manifest after the collection: %d %s", code, body)
	}
	// A manifest naming the removed blob is refused, not stored broken.
	bad := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":32},"layers":[]}`, ocispec.MediaTypeImageManifest, orphan)
	if code, _ := e.req("PUT", "/v2/app/manifests/v2", []byte(bad), "Content-Type", ocispec.MediaTypeImageManifest); code != 400 {
		t.Errorf("manifest naming a collected blob: %d, want 400", code)
	}
}
