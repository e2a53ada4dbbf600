package registry_test

import (
	"fmt"
	"net/http"
	"testing"
)

// TestManifestBlobsRequired: a manifest is stored only when the blobs it
// names are in its repository (another repository's copy does not count);
// an index may name manifests not pushed (sparse), a layer with URLs
// need not be there.
func TestManifestBlobsRequired(t *testing.T) {
	srv := newServer(t)
	cfg := pushBlob(t, srv.URL, "other", []byte("{}"))
	layer := pushBlob(t, srv.URL, "other", []byte("layer"))
	m := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":%q,"size":5}]}`, mtManifest, cfg, layer)
	put := func() resp {
		return do(t, "PUT", srv.URL+"/v2/app/manifests/v1", map[string]string{"Content-Type": mtManifest}, []byte(m))
	}
	if r := put(); r.code != http.StatusBadRequest || errorCode(t, r.body) != "MANIFEST_BLOB_UNKNOWN" {
		t.Fatalf("manifest naming blobs of another repository: %d %s", r.code, r.body)
	}
	pushBlob(t, srv.URL, "app", []byte("{}"))
	if r := put(); r.code != http.StatusBadRequest {
		t.Fatalf("manifest naming a missing layer: %d %s", r.code, r.body)
	}
	pushBlob(t, srv.URL, "app", []byte("layer"))
	if r := put(); r.code != http.StatusCreated {
		t.Fatalf("manifest with its blobs: %d %s", r.code, r.body)
	}
	foreign := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar","digest":"sha256:%064x","size":5,"urls":["https://example.invalid/l"]}]}`, mtManifest, cfg, 7)
	if r := do(t, "PUT", srv.URL+"/v2/app/manifests/foreign", map[string]string{"Content-Type": mtManifest}, []byte(foreign)); r.code != http.StatusCreated {
		t.Fatalf("manifest with a foreign layer: %d %s", r.code, r.body)
	}
	index := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[{"mediaType":%q,"digest":"sha256:%064x","size":100}]}`, mtIndex, mtManifest, 9)
	if r := do(t, "PUT", srv.URL+"/v2/app/manifests/sparse", map[string]string{"Content-Type": mtIndex}, []byte(index)); r.code != http.StatusCreated {
		t.Fatalf("sparse index: %d %s", r.code, r.body)
	}
}
