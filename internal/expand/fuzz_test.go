package expand_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

// FuzzExtensionRoutes throws arbitrary requests at strata's extension
// routes of a repository holding an expanded image: the layer-mount,
// index and profile routes with any path suffix, method and body (profile
// JSON above all: frames, ranges, ranks, pages). Oracles: no panic, no
// 5xx, and the image's stored profile, if a PUT was accepted, reads back
// as valid JSON. The seeds run in every `go test`; to search:
//
//	go test -run '^$' -fuzz '^FuzzExtensionRoutes$' -fuzztime 60s ./internal/expand/
func FuzzExtensionRoutes(f *testing.F) {
	st, err := store.Open(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	svc, err := expand.New(st, expand.Options{})
	if err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go svc.Run(ctx)
	reg := registry.New(st, registry.Options{OnManifest: svc.OnManifest})
	reg.Extension(api.Extension, svc.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
	srv := httptest.NewServer(reg)
	defer srv.Close()
	tr, err := ocilayout.Tar([]ocilayout.Entry{{Name: "etc/", Type: '5'}, {Name: "etc/f", Content: bytes.Repeat([]byte("strata "), 3000)}})
	if err != nil {
		f.Fatal(err)
	}
	l := ocilayout.GzipLayer(tr)
	post := func(path string, body []byte, hdr ...string) (int, []byte) {
		req, _ := http.NewRequest("POST", srv.URL+path, bytes.NewReader(body))
		if len(hdr) == 2 {
			req.Method = hdr[0]
			req.Header.Set("Content-Type", hdr[1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, b.Bytes()
	}
	layer := digest.FromBytes(l.Blob)
	post("/v2/app/blobs/uploads/?digest="+layer.String(), l.Blob)
	cb, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{l.DiffID}}})
	post("/v2/app/blobs/uploads/?digest="+digest.FromBytes(cb).String(), cb)
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))},
		Layers: []ocispec.Descriptor{{MediaType: l.MediaType, Digest: layer, Size: int64(len(l.Blob))}}}
	m.SchemaVersion = 2
	mb, _ := json.Marshal(m)
	if code, body := post("/v2/app/manifests/v1", mb, "PUT", ocispec.MediaTypeImageManifest); code != 201 {
		f.Fatalf("push: %d %s", code, body)
	}
	md := digest.FromBytes(mb)
	var desc api.MountDescriptor
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		code, body := post(api.MountPath("app", layer), nil)
		if code == 200 {
			json.Unmarshal(body, &desc)
			break
		}
		if time.Now().After(deadline) {
			f.Fatalf("no expansion: %d", code)
		}
	}
	profilePath := api.ProfilePath("app", md)
	good, _ := json.Marshal(api.Profile{Version: 1, Layers: []api.ProfileLayer{{Layer: layer, Data: desc.Data.Digest, Frames: []int{0}, Pages: [][2]int64{{0, 4096}}}}})
	f.Add("PUT", "profile", good)
	f.Add("PUT", "profile", []byte(`{"version":1,"layers":[{"layer":"`+layer.String()+`","data":"`+desc.Data.Digest.String()+`","frames":[0,0],"ranges":[[-1,5],[9223372036854775807,9223372036854775807]],"ranks":[1,1],"pages":[[9223372036854775000,1000]],"pageRanks":[0]}]}`))
	f.Add("GET", "/layers/"+layer.String()+"/index", []byte(nil))
	f.Add("POST", "/layers/"+layer.String()+"/mount", []byte(nil))
	f.Add("POST", "/layers/sha256:zz/mount", []byte(nil))
	f.Add("GET", "/profiles/"+md.String()+"/../../x", []byte(nil))
	f.Fuzz(func(t *testing.T, method, suffix string, body []byte) {
		path := "/v2/app/_" + api.Extension + suffix
		if suffix == "profile" {
			path = profilePath
		}
		req, err := http.NewRequest(method, srv.URL+path, bytes.NewReader(body))
		if err != nil {
			return
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode >= 500 {
			t.Fatalf("%s %s: %d", method, path, resp.StatusCode)
		}
		if method == "PUT" && resp.StatusCode == 201 {
			code, b := post(profilePath, nil, "GET", "")
			if code != 200 || !json.Valid(b) {
				t.Fatalf("stored profile reads back %d %q", code, b)
			}
		}
	})
}
