package expand_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

// server is a registry with the expansion service, on a real socket.
type server struct {
	*httptest.Server
	st     *store.Store
	cancel context.CancelFunc
	done   chan struct{}
}

func start(t *testing.T, root string) *server {
	t.Helper()
	st, err := store.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := expand.New(st, expand.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	reg := registry.New(st, registry.Options{OnManifest: svc.OnManifest})
	reg.Extension(api.Extension, svc.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
	s := &server{Server: httptest.NewServer(reg), st: st, cancel: cancel, done: done}
	t.Cleanup(s.stop)
	return s
}

func (s *server) stop() {
	s.Server.Close()
	s.cancel()
	<-s.done
}

func req(t *testing.T, method, url string, body []byte, hdr ...string) (int, http.Header, []byte) {
	t.Helper()
	r, _ := http.NewRequest(method, url, bytes.NewReader(body))
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

func pushBlob(t *testing.T, base, repo string, b []byte) ocispec.Descriptor {
	t.Helper()
	d := digest.FromBytes(b)
	if code, _, body := req(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+d.String(), b); code != 201 {
		t.Fatalf("push blob: %d %s", code, body)
	}
	return ocispec.Descriptor{Digest: d, Size: int64(len(b))}
}

// pushImage pushes an image of the given layers and returns the manifest
// digest and the layer descriptors.
func pushImage(t *testing.T, base, repo, tag string, layers ...ocilayout.Layer) (digest.Digest, []ocispec.Descriptor) {
	t.Helper()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	var descs []ocispec.Descriptor
	for _, l := range layers {
		d := pushBlob(t, base, repo, l.Blob)
		d.MediaType = l.MediaType
		descs = append(descs, d)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
	}
	cb, _ := json.Marshal(cfg)
	cd := pushBlob(t, base, repo, cb)
	cd.MediaType = ocispec.MediaTypeImageConfig
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: cd, Layers: descs}
	m.SchemaVersion = 2
	mb, _ := json.Marshal(m)
	code, _, body := req(t, "PUT", base+"/v2/"+repo+"/manifests/"+tag, mb, "Content-Type", ocispec.MediaTypeImageManifest)
	if code != 201 {
		t.Fatalf("push manifest: %d %s", code, body)
	}
	return digest.FromBytes(mb), descs
}

// mount polls the mount route until it stops answering 202.
func mount(t *testing.T, base, repo string, layer digest.Digest) (int, []byte) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, hdr, body := req(t, "POST", base+api.MountPath(repo, layer), nil)
		if code != http.StatusAccepted {
			return code, body
		}
		if hdr.Get("Retry-After") == "" {
			t.Fatal("202 without Retry-After")
		}
		if time.Now().After(deadline) {
			t.Fatal("expansion did not finish in 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func files(t *testing.T) ([]byte, map[string][]byte) {
	content := map[string][]byte{
		"etc/hello":    []byte("hello\n"),
		"usr/lib/big":  bytes.Repeat([]byte("0123456789abcdef"), 200000), // 3.2 MB: spans frames
		"usr/bin/tool": []byte("#!/bin/sh\necho tool\n"),
	}
	tr, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "etc/hello", Content: content["etc/hello"]},
		{Name: "usr/", Type: tar.TypeDir},
		{Name: "usr/lib/", Type: tar.TypeDir},
		{Name: "usr/lib/big", Content: content["usr/lib/big"]},
		{Name: "usr/bin/", Type: tar.TypeDir},
		{Name: "usr/bin/tool", Content: content["usr/bin/tool"], Mode: 0o755},
		{Name: "usr/bin/sh", Type: tar.TypeSymlink, Linkname: "tool"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return tr, content
}

func TestMountAPI(t *testing.T) {
	srv := start(t, t.TempDir())
	tr, content := files(t)
	layer := ocilayout.GzipLayer(tr)
	md, descs := pushImage(t, srv.URL, "lib/app", "v1", layer)

	// Discovery.
	code, _, body := req(t, "GET", srv.URL+api.InfoPath, nil)
	var info api.Info
	if code != 200 || json.Unmarshal(body, &info) != nil || len(info.Versions) == 0 || info.Versions[0] != layerindex.Version {
		t.Fatalf("info: %d %s", code, body)
	}

	code, body = mount(t, srv.URL, "lib/app", descs[0].Digest)
	if code != 200 {
		t.Fatalf("mount: %d %s", code, body)
	}
	var mdesc api.MountDescriptor
	if err := json.Unmarshal(body, &mdesc); err != nil {
		t.Fatal(err)
	}
	if mdesc.Layer != descs[0].Digest || mdesc.DiffID != layer.DiffID || mdesc.Version != layerindex.Version ||
		mdesc.Index.MediaType != layerindex.MediaTypeIndex || mdesc.Data.MediaType != layerindex.MediaTypeData {
		t.Fatalf("mount descriptor: %+v", mdesc)
	}

	// The index comes through the ordinary blob route and binds to the layer.
	code, _, ib := req(t, "GET", srv.URL+"/v2/lib/app/blobs/"+mdesc.Index.Digest.String(), nil)
	if code != 200 || digest.FromBytes(ib) != mdesc.Index.Digest {
		t.Fatalf("index blob: %d", code)
	}
	ix, err := layerindex.Decode(ib)
	if err != nil {
		t.Fatal(err)
	}
	if ix.Layer != descs[0].Digest || ix.DiffID != layer.DiffID {
		t.Fatalf("index bound to %s/%s", ix.Layer, ix.DiffID)
	}
	// Read each file with ranged GETs of just its frames, verified.
	for name, want := range content {
		i, ok := ix.Lookup(name)
		if !ok {
			t.Fatalf("%s not in index", name)
		}
		e := ix.Entries[i]
		first, last := ix.FramesFor(e.Offset, e.Size)
		var stream []byte
		for f := first; f <= last; f++ {
			fr := ix.Frames[f]
			code, _, cb := req(t, "GET", srv.URL+"/v2/lib/app/blobs/"+mdesc.Data.Digest.String(), nil,
				"Range", fmt.Sprintf("bytes=%d-%d", fr.COffset, fr.COffset+fr.CSize-1))
			if code != 206 {
				t.Fatalf("frame %d: status %d", f, code)
			}
			plain, err := ix.DecodeFrame(f, cb)
			if err != nil {
				t.Fatalf("frame %d: %v", f, err)
			}
			stream = append(stream, plain...)
		}
		off := e.Offset - ix.Frames[first].UOffset
		if got := stream[off : off+e.Size]; !bytes.Equal(got, want) {
			t.Errorf("%s: content differs", name)
		}
		if digest.FromBytes(want) != e.Digest {
			t.Errorf("%s: digest in index %s", name, e.Digest)
		}
	}
	if name := "usr/lib/big"; true {
		i, _ := ix.Lookup(name)
		if f, l := ix.FramesFor(ix.Entries[i].Offset, ix.Entries[i].Size); l == f {
			t.Errorf("%s (3.2 MB) fits one frame; frames should be about 1 MiB", name)
		}
	}

	// The index route: the same index in one request, zstd on the wire
	// when asked for.
	code, h, plain := req(t, "GET", srv.URL+api.IndexPath("lib/app", descs[0].Digest), nil)
	if code != 200 || !bytes.Equal(plain, ib) || h.Get("Docker-Content-Digest") != mdesc.Index.Digest.String() || h.Get("Content-Encoding") != "" {
		t.Fatalf("index route: %d %v, %d bytes", code, h, len(plain))
	}
	code, h, zb := req(t, "GET", srv.URL+api.IndexPath("lib/app", descs[0].Digest), nil, "Accept-Encoding", "gzip, zstd")
	zr, _ := zstd.NewReader(nil)
	unz, err := zr.DecodeAll(zb, nil)
	if code != 200 || h.Get("Content-Encoding") != "zstd" || err != nil || !bytes.Equal(unz, ib) || len(zb) >= len(ib) {
		t.Fatalf("index route, zstd: %d %v, %d bytes (%v), %d plain", code, h, len(zb), err, len(ib))
	}
	if code, h, b := req(t, "HEAD", srv.URL+api.IndexPath("lib/app", descs[0].Digest), nil, "Accept-Encoding", "zstd"); code != 200 || len(b) != 0 || h.Get("Content-Length") != strconv.Itoa(len(zb)) {
		t.Errorf("HEAD of the index route: %d %v", code, h)
	}
	if code, h, _ := req(t, "GET", srv.URL+api.IndexPath("lib/app", descs[0].Digest), nil, "Accept-Encoding", "zstd;q=0"); code != 200 || h.Get("Content-Encoding") != "" {
		t.Errorf("index route refusing zstd: %d %v", code, h)
	}
	if code, _, body := req(t, "GET", srv.URL+api.IndexPath("lib/app", digest.FromString("absent")), nil); code != 404 || !strings.Contains(string(body), "BLOB_UNKNOWN") {
		t.Errorf("index of an absent layer: %d %s", code, body)
	}
	if code, _, _ := req(t, "POST", srv.URL+api.IndexPath("lib/app", descs[0].Digest), nil); code != 405 {
		t.Errorf("POST on the index route: %d", code)
	}

	// The expansion is published as a referrer of the image manifest.
	var idx ocispec.Index
	deadline := time.Now().Add(10 * time.Second)
	for len(idx.Manifests) == 0 && time.Now().Before(deadline) {
		_, _, body = req(t, "GET", srv.URL+"/v2/lib/app/referrers/"+md.String()+"?artifactType="+layerindex.ArtifactTypeExpansion, nil)
		json.Unmarshal(body, &idx)
		time.Sleep(20 * time.Millisecond)
	}
	if len(idx.Manifests) != 1 || idx.Manifests[0].ArtifactType != layerindex.ArtifactTypeExpansion {
		t.Fatalf("referrers: %s", body)
	}
	_, _, ab := req(t, "GET", srv.URL+"/v2/lib/app/manifests/"+idx.Manifests[0].Digest.String(), nil)
	var art ocispec.Manifest
	json.Unmarshal(ab, &art)
	if art.Subject == nil || art.Subject.Digest != md || len(art.Layers) != 2 ||
		art.Layers[0].Digest != mdesc.Index.Digest || art.Layers[1].Digest != mdesc.Data.Digest ||
		art.Layers[0].Annotations[api.AnnotationLayer] != descs[0].Digest.String() {
		t.Fatalf("artifact: %s", ab)
	}

	// A second repository with the same layer reuses the expansion.
	code, _, _ = req(t, "POST", srv.URL+"/v2/other/blobs/uploads/?mount="+descs[0].Digest.String()+"&from=lib/app", nil)
	if code != 201 {
		t.Fatalf("cross mount: %d", code)
	}
	if code, body = mount(t, srv.URL, "other", descs[0].Digest); code != 200 {
		t.Fatalf("mount in second repo: %d %s", code, body)
	}
	if code, _, _ = req(t, "HEAD", srv.URL+"/v2/other/blobs/"+mdesc.Data.Digest.String(), nil); code != 200 {
		t.Fatalf("data blob not readable from the second repo: %d", code)
	}

	// Errors.
	if code, body = mount(t, srv.URL, "lib/app", digest.FromString("absent")); code != 404 || !strings.Contains(string(body), "BLOB_UNKNOWN") {
		t.Errorf("absent layer: %d %s", code, body)
	}
	if code, _, _ = req(t, "GET", srv.URL+api.MountPath("lib/app", descs[0].Digest), nil); code != 405 {
		t.Errorf("GET on the mount route: %d", code)
	}
}

func TestHostileLayerRefusedAndStillPullable(t *testing.T) {
	srv := start(t, t.TempDir())
	tr, err := ocilayout.Tar([]ocilayout.Entry{{Name: "../../etc/passwd", Content: []byte("root::0:0::/:/bin/sh\n")}})
	if err != nil {
		t.Fatal(err)
	}
	bad := ocilayout.GzipLayer(tr)
	goodTar, _ := files(t)
	good := ocilayout.GzipLayer(goodTar)
	_, descs := pushImage(t, srv.URL, "evil", "v1", good, bad)

	code, body := mount(t, srv.URL, "evil", descs[1].Digest)
	if code != http.StatusUnprocessableEntity || !strings.Contains(string(body), api.CodeExpansionFailed) || !strings.Contains(string(body), "..") {
		t.Fatalf("hostile layer: %d %s", code, body)
	}
	if code, _, b := req(t, "GET", srv.URL+"/v2/evil/blobs/"+descs[1].Digest.String(), nil); code != 200 || !bytes.Equal(b, bad.Blob) {
		t.Fatalf("hostile layer no longer pullable: %d", code)
	}
	// The registry keeps serving the good layer of the same image.
	if code, body = mount(t, srv.URL, "evil", descs[0].Digest); code != 200 {
		t.Fatalf("good layer next to a hostile one: %d %s", code, body)
	}
	// A config blob is not a layer either.
	cfg := pushBlob(t, srv.URL, "evil", []byte(`{"not":"a tar"}`))
	if code, body = mount(t, srv.URL, "evil", cfg.Digest); code != http.StatusUnprocessableEntity {
		t.Fatalf("non-layer blob: %d %s", code, body)
	}
}

func TestRestartRedoesQueuedWork(t *testing.T) {
	root := t.TempDir()
	srv := start(t, root)
	tr, _ := files(t)
	layer := ocilayout.GzipLayer(tr)
	_, descs := pushImage(t, srv.URL, "r", "v1", layer)
	srv.stop()
	// Whatever the first process finished or not, a new one must answer.
	srv2 := start(t, root)
	if code, body := mount(t, srv2.URL, "r", descs[0].Digest); code != 200 {
		t.Fatalf("after restart: %d %s", code, body)
	}
}

// TestCrashingExpansionNotRetried: a layer whose expansion began three
// times without ending (the registry killed during each, say for memory)
// is recorded as failed at the next start, not expanded a fourth time; one
// that began twice gets its third attempt.
func TestCrashingExpansionNotRetried(t *testing.T) {
	root := t.TempDir()
	st, err := store.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	plain := httptest.NewServer(registry.New(st, registry.Options{}))
	tr, _ := files(t)
	layer := ocilayout.GzipLayer(tr)
	otherTar, err := ocilayout.Tar([]ocilayout.Entry{{Name: "b", Content: []byte("other")}})
	if err != nil {
		t.Fatal(err)
	}
	other := ocilayout.GzipLayer(otherTar)
	bad := pushBlob(t, plain.URL, "r", layer.Blob)
	retry := pushBlob(t, plain.URL, "r", other.Blob)
	plain.Close()
	dir := filepath.Join(root, "expand")
	for _, c := range []struct {
		d        digest.Digest
		attempts string
	}{{bad.Digest, "3"}, {retry.Digest, "2"}} {
		name := string(c.d.Algorithm()) + "-" + c.d.Encoded()
		for sub, content := range map[string]string{"queue": `{"layer":"` + c.d.String() + `","repos":["r"]}`, "started": c.attempts} {
			os.MkdirAll(filepath.Join(dir, sub), 0o755)
			if err := os.WriteFile(filepath.Join(dir, sub, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	srv := start(t, root)
	code, body := mount(t, srv.URL, "r", bad.Digest)
	if code != http.StatusUnprocessableEntity || !strings.Contains(string(body), "began 3 times") {
		t.Fatalf("layer that crashed the registry 3 times: %d %s", code, body)
	}
	if code, body := mount(t, srv.URL, "r", retry.Digest); code != 200 {
		t.Fatalf("layer that crashed it twice: %d %s", code, body)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "started")); len(ents) != 0 {
		t.Errorf("attempt records left: %v", ents)
	}
	if code, _, b := req(t, "GET", srv.URL+"/v2/r/blobs/"+bad.Digest.String(), nil); code != 200 || !bytes.Equal(b, layer.Blob) {
		t.Fatalf("failed layer no longer pullable: %d", code)
	}
}

// TestXattrBombRefused: a layer of large xattrs (half a megabyte of gzip
// that expanded to a 589 MB index with gigabytes of memory) is refused for
// the metadata budget, recorded as failed, and still pulls whole.
func TestXattrBombRefused(t *testing.T) {
	srv := start(t, t.TempDir())
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	val := strings.Repeat("x", 64<<10-100)
	for i := range 200 {
		pax := map[string]string{}
		for j := range 15 {
			pax[fmt.Sprintf("SCHILY.xattr.user.a%02d", j)] = val
		}
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("f%05d", i), Mode: 0o644, Typeflag: tar.TypeReg, PAXRecords: pax, Format: tar.FormatPAX}); err != nil {
			t.Fatal(err)
		}
	}
	tw.Close()
	bomb := ocilayout.GzipLayer(buf.Bytes())
	_, descs := pushImage(t, srv.URL, "bomb", "v1", bomb)
	code, body := mount(t, srv.URL, "bomb", descs[0].Digest)
	if code != http.StatusUnprocessableEntity || !strings.Contains(string(body), "metadata budget") {
		t.Fatalf("xattr bomb: %d %s", code, body)
	}
	if code, _, b := req(t, "GET", srv.URL+"/v2/bomb/blobs/"+descs[0].Digest.String(), nil); code != 200 || !bytes.Equal(b, bomb.Blob) {
		t.Fatalf("bomb layer no longer pullable: %d", code)
	}
}
