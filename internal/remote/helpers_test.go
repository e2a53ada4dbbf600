package remote_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// fastRetry keeps fault tests short: three attempts, millisecond backoff.
var fastRetry = remote.RetryPolicy{Attempts: 3, MinBackoff: 2 * time.Millisecond, MaxBackoff: 10 * time.Millisecond, MaxElapsed: 3 * time.Second}

// newClient returns a client reaching every registry over plain HTTP with
// fast retries; opts fields that are set win.
func newClient(t *testing.T, opts remote.Options) *remote.Client {
	t.Helper()
	if opts.Hosts == nil {
		opts.Hosts = remote.PlainHosts(func(string) bool { return true })
	}
	if opts.Retry == (remote.RetryPolicy{}) {
		opts.Retry = fastRetry
	}
	if opts.Timeout == 0 {
		opts.Timeout = 2 * time.Second
	}
	return remote.New(opts)
}

// newRegistry starts strata's registry on a real socket and returns its
// base URL and host:port.
func newRegistry(t *testing.T) (string, string) {
	srv := newRegistryServer(t, nil, nil)
	return srv.URL, hostOf(srv)
}

// newRegistryServer starts strata's registry with ext (if not nil) as the
// strata extension, behind wrap (if not nil), which may inject faults.
func newRegistryServer(t *testing.T, ext http.Handler, wrap func(next http.Handler) http.Handler) *httptest.Server {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(st, registry.Options{})
	if ext != nil {
		reg.Extension(api.Extension, ext)
	}
	var h http.Handler = reg
	if wrap != nil {
		h = wrap(reg)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

func hostOf(srv *httptest.Server) string { return srv.Listener.Addr().String() }

func parseRef(t *testing.T, s string) remote.Reference {
	t.Helper()
	r, err := remote.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// pushBlob uploads data monolithically (POST …/blobs/uploads/?digest=).
func pushBlob(t *testing.T, base, repo, mediaType string, data []byte) ocispec.Descriptor {
	t.Helper()
	d := digest.FromBytes(data)
	resp, err := http.Post(base+"/v2/"+repo+"/blobs/uploads/?digest="+d.String(), "application/octet-stream", bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push blob %s: %s", d, resp.Status)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
}

// pushManifest PUTs a manifest under ref (a tag or digest).
func pushManifest(t *testing.T, base, repo, ref, mediaType string, body []byte) ocispec.Descriptor {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, base+"/v2/"+repo+"/manifests/"+ref, bytes.NewReader(body))
	req.Header.Set("Content-Type", mediaType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push manifest %s:%s: %s", repo, ref, resp.Status)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(body), Size: int64(len(body))}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testImage is an image built for a test: its layers, config and manifest.
type testImage struct {
	layers   [][]byte
	config   ocispec.Image
	rawCfg   []byte
	manifest ocispec.Manifest
	raw      []byte
	desc     ocispec.Descriptor // of the manifest, with Platform set
}

// buildImage makes an image for platform with two layers whose contents
// name it (the "layers" are not tars: the registry does not look inside).
func buildImage(t *testing.T, p ocispec.Platform, docker bool) testImage {
	t.Helper()
	var img testImage
	name := strings.Join([]string{p.OS, p.Architecture, p.Variant}, "-")
	img.layers = [][]byte{
		bytes.Repeat([]byte("base layer of "+name+"\n"), 300),
		[]byte("top layer of " + name),
	}
	img.config = ocispec.Image{
		Platform: ocispec.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant},
		Config: ocispec.ImageConfig{
			User: "1000:1000", Env: []string{"PATH=/usr/bin", "PLATFORM=" + name},
			Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"echo " + name}, WorkingDir: "/srv",
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	layerType, cfgType, mt := ocispec.MediaTypeImageLayer, ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageManifest
	if docker {
		layerType, cfgType, mt = "application/vnd.docker.image.rootfs.diff.tar", remote.MediaTypeDockerConfig, remote.MediaTypeDockerManifest
	}
	img.manifest = ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: mt}
	for _, l := range img.layers {
		img.config.RootFS.DiffIDs = append(img.config.RootFS.DiffIDs, digest.FromBytes(l))
		img.manifest.Layers = append(img.manifest.Layers, ocispec.Descriptor{MediaType: layerType, Digest: digest.FromBytes(l), Size: int64(len(l))})
	}
	img.rawCfg = mustJSON(t, img.config)
	img.manifest.Config = ocispec.Descriptor{MediaType: cfgType, Digest: digest.FromBytes(img.rawCfg), Size: int64(len(img.rawCfg))}
	img.raw = mustJSON(t, img.manifest)
	img.desc = ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(img.raw), Size: int64(len(img.raw)), Platform: &p}
	return img
}

// push uploads the image's blobs and its manifest under ref.
func (img testImage) push(t *testing.T, base, repo, ref string) {
	t.Helper()
	for i, l := range img.layers {
		pushBlob(t, base, repo, img.manifest.Layers[i].MediaType, l)
	}
	pushBlob(t, base, repo, img.manifest.Config.MediaType, img.rawCfg)
	pushManifest(t, base, repo, ref, img.manifest.MediaType, img.raw)
}

// pushIndex pushes images and an index of them under tag.
func pushIndex(t *testing.T, base, repo, tag string, docker bool, imgs ...testImage) ocispec.Descriptor {
	t.Helper()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	if docker {
		idx.MediaType = remote.MediaTypeDockerManifestList
	}
	for _, img := range imgs {
		img.push(t, base, repo, img.desc.Digest.String())
		idx.Manifests = append(idx.Manifests, img.desc)
	}
	return pushManifest(t, base, repo, tag, idx.MediaType, mustJSON(t, idx))
}

func platformName(p ocispec.Platform) string {
	return fmt.Sprintf("%s/%s/%s", p.OS, p.Architecture, p.Variant)
}
