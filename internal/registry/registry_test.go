package registry_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

func newServer(t *testing.T) *httptest.Server {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(st, registry.Options{})
	srv := httptest.NewServer(registry.Handler(reg, registry.ServeConfig{Store: st, Metrics: registry.NewMetrics()}))
	t.Cleanup(srv.Close)
	return srv
}

type resp struct {
	code int
	hdr  http.Header
	body string
}

func do(t *testing.T, method, url string, hdr map[string]string, body []byte) resp {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return resp{r.StatusCode, r.Header, string(b)}
}

func errorCode(t *testing.T, body string) string {
	t.Helper()
	var e struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || len(e.Errors) == 0 {
		t.Fatalf("not an OCI error body: %q", body)
	}
	return e.Errors[0].Code
}

func pushBlob(t *testing.T, base, repo string, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	r := do(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+d.String(), nil, b)
	if r.code != http.StatusCreated {
		t.Fatalf("push blob: %d %s", r.code, r.body)
	}
	return d
}

const mtManifest = "application/vnd.oci.image.manifest.v1+json"
const mtIndex = "application/vnd.oci.image.index.v1+json"

func TestManifestValidation(t *testing.T) {
	srv := newServer(t)
	cfg := pushBlob(t, srv.URL, "r", []byte("{}"))
	good := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":2},"layers":[]}`, mtManifest, cfg)
	big := `{"schemaVersion":2,"mediaType":"` + mtManifest + `","config":{"mediaType":"x","digest":"` + cfg.String() + `","size":2},"annotations":{"pad":"` + strings.Repeat("a", 4<<20) + `"}}`
	tests := []struct {
		name, ref, contentType, body string
		code                         int
		errCode                      string
	}{
		{"good", "t1", mtManifest, good, 201, ""},
		{"content type mismatch", "t2", mtIndex, good, 400, "MANIFEST_INVALID"},
		{"ambiguous", "t3", mtIndex, `{"schemaVersion":2,"mediaType":"` + mtIndex + `","manifests":[],"layers":[]}`, 400, "MANIFEST_INVALID"},
		{"ambiguous without media type", "t3", mtManifest, `{"schemaVersion":2,"config":{"mediaType":"x","digest":"` + cfg.String() + `","size":2},"manifests":[]}`, 400, "MANIFEST_INVALID"},
		{"not json", "t4", mtManifest, `{not json`, 400, "MANIFEST_INVALID"},
		{"schema version 1", "t5", mtManifest, `{"schemaVersion":1,"mediaType":"` + mtManifest + `"}`, 400, "MANIFEST_INVALID"},
		{"unknown media type", "t6", "application/x-foo", `{"schemaVersion":2,"mediaType":"application/x-foo"}`, 400, "MANIFEST_INVALID"},
		{"bad layer digest", "t7", mtManifest, `{"schemaVersion":2,"mediaType":"` + mtManifest + `","config":{"mediaType":"x","digest":"sha256:zz","size":2},"layers":[]}`, 400, "MANIFEST_INVALID"},
		{"too large", "t8", mtManifest, big, 413, "SIZE_INVALID"},
		{"digest mismatch", digest.FromString("x").String(), mtManifest, good, 400, "DIGEST_INVALID"},
		{"malformed digest", "sha256:baddigeststring", mtManifest, good, 400, "DIGEST_INVALID"},
		{"invalid tag", "-bad", mtManifest, good, 400, "MANIFEST_INVALID"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, "PUT", srv.URL+"/v2/r/manifests/"+tc.ref, map[string]string{"Content-Type": tc.contentType}, []byte(tc.body))
			if r.code != tc.code {
				t.Fatalf("status %d, want %d: %s", r.code, tc.code, r.body)
			}
			if tc.errCode != "" {
				if got := errorCode(t, r.body); got != tc.errCode {
					t.Fatalf("code %s, want %s", got, tc.errCode)
				}
			}
		})
	}
	r := do(t, "GET", srv.URL+"/v2/r/manifests/t1", nil, nil)
	if r.code != 200 || r.body != good || r.hdr.Get("Content-Type") != mtManifest || r.hdr.Get("Docker-Content-Digest") != digest.FromString(good).String() {
		t.Fatalf("get manifest: %d %v", r.code, r.hdr)
	}
}

func TestChunkedUploadErrors(t *testing.T) {
	srv := newServer(t)
	r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/", nil, nil)
	if r.code != 202 {
		t.Fatalf("start: %d", r.code)
	}
	loc := srv.URL + r.hdr.Get("Location")
	data := []byte("0123456789")
	if r = do(t, "PATCH", loc, map[string]string{"Content-Range": "0-4"}, data[:5]); r.code != 202 || r.hdr.Get("Range") != "0-4" {
		t.Fatalf("chunk 1: %d range %q", r.code, r.hdr.Get("Range"))
	}
	if r = do(t, "PATCH", loc, map[string]string{"Content-Range": "7-9"}, data[7:]); r.code != http.StatusRequestedRangeNotSatisfiable {
		t.Fatalf("out of order chunk: %d", r.code)
	}
	if r = do(t, "PATCH", loc, map[string]string{"Content-Range": "5-7"}, data[5:]); r.code != 400 {
		t.Fatalf("Content-Range and length disagree: %d", r.code)
	}
	if r = do(t, "GET", loc, nil, nil); r.code != 204 || r.hdr.Get("Range") != "0-4" {
		t.Fatalf("status: %d %q", r.code, r.hdr.Get("Range"))
	}
	bad := digest.FromString("wrong")
	if r = do(t, "PUT", loc+"?digest="+bad.String(), map[string]string{"Content-Range": "5-9"}, data[5:]); r.code != 400 || errorCode(t, r.body) != "DIGEST_INVALID" {
		t.Fatalf("bad digest: %d %s", r.code, r.body)
	}
	if r = do(t, "HEAD", srv.URL+"/v2/r/blobs/"+digest.FromBytes(data).String(), nil, nil); r.code != 404 {
		t.Fatalf("blob visible after a failed commit: %d", r.code)
	}
	if r = do(t, "GET", loc, nil, nil); r.code != 404 {
		t.Fatalf("session survives a failed commit: %d", r.code)
	}
	if r = do(t, "GET", srv.URL+"/v2/r/blobs/uploads/not-a-session", nil, nil); r.code != 404 || errorCode(t, r.body) != "BLOB_UPLOAD_UNKNOWN" {
		t.Fatalf("unknown session: %d %s", r.code, r.body)
	}
}

func TestBlobRanges(t *testing.T) {
	srv := newServer(t)
	data := bytes.Repeat([]byte("abcdefghij"), 100)
	d := pushBlob(t, srv.URL, "r", data)
	u := srv.URL + "/v2/r/blobs/" + d.String()
	tests := []struct {
		rng   string
		code  int
		body  string
		crang string
	}{
		{"bytes=0-9", 206, string(data[:10]), "bytes 0-9/1000"},
		{"bytes=990-", 206, string(data[990:]), "bytes 990-999/1000"},
		{"bytes=-5", 206, string(data[995:]), "bytes 995-999/1000"},
		{"bytes=900-5000", 206, string(data[900:]), "bytes 900-999/1000"},
		{"bytes=500-0", 416, "", ""},
		{"bytes=1000-1001", 416, "", ""},
	}
	for _, tc := range tests {
		r := do(t, "GET", u, map[string]string{"Range": tc.rng}, nil)
		if r.code != tc.code {
			t.Errorf("%s: status %d, want %d", tc.rng, r.code, tc.code)
			continue
		}
		if tc.code == 206 && (r.body != tc.body || r.hdr.Get("Content-Range") != tc.crang) {
			t.Errorf("%s: Content-Range %q body %d bytes", tc.rng, r.hdr.Get("Content-Range"), len(r.body))
		}
	}
	if r := do(t, "GET", srv.URL+"/v2/r/blobs/sha256:abc", nil, nil); r.code != 400 || errorCode(t, r.body) != "DIGEST_INVALID" {
		t.Errorf("malformed digest: %d", r.code)
	}
	if r := do(t, "GET", srv.URL+"/v2/Bad_Name/blobs/"+d.String(), nil, nil); r.code != 400 || errorCode(t, r.body) != "NAME_INVALID" {
		t.Errorf("invalid name: %d", r.code)
	}
}

func TestPagination(t *testing.T) {
	srv := newServer(t)
	cfg := pushBlob(t, srv.URL, "a", []byte("{}"))
	m := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":2},"layers":[]}`, mtManifest, cfg)
	for _, repo := range []string{"a", "b/c", "d"} {
		pushBlob(t, srv.URL, repo, []byte("{}"))
		for _, tag := range []string{"t1", "t2", "t3"} {
			if r := do(t, "PUT", srv.URL+"/v2/"+repo+"/manifests/"+tag, map[string]string{"Content-Type": mtManifest}, []byte(m)); r.code != 201 {
				t.Fatalf("put %s:%s: %d %s", repo, tag, r.code, r.body)
			}
		}
	}
	r := do(t, "GET", srv.URL+"/v2/_catalog?n=2", nil, nil)
	if r.code != 200 || !strings.Contains(r.body, `["a","b/c"]`) || !strings.Contains(r.hdr.Get("Link"), `last=b%2Fc`) {
		t.Fatalf("catalog page 1: %s link %q", r.body, r.hdr.Get("Link"))
	}
	r = do(t, "GET", srv.URL+"/v2/_catalog?n=2&last=b/c", nil, nil)
	if !strings.Contains(r.body, `["d"]`) || r.hdr.Get("Link") != "" {
		t.Fatalf("catalog page 2: %s link %q", r.body, r.hdr.Get("Link"))
	}
	r = do(t, "GET", srv.URL+"/v2/b/c/tags/list?n=1&last=t1", nil, nil)
	if !strings.Contains(r.body, `"tags":["t2"]`) || !strings.Contains(r.hdr.Get("Link"), "rel=\"next\"") {
		t.Fatalf("tags page: %s link %q", r.body, r.hdr.Get("Link"))
	}
	r = do(t, "GET", srv.URL+"/v2/b/c/tags/list?n=100000", nil, nil)
	if !strings.Contains(r.body, `["t1","t2","t3"]`) {
		t.Fatalf("clamped n: %s", r.body)
	}
	if r = do(t, "GET", srv.URL+"/v2/nope/tags/list", nil, nil); r.code != 404 || errorCode(t, r.body) != "NAME_UNKNOWN" {
		t.Fatalf("unknown repo tags: %d", r.code)
	}
	if r = do(t, "GET", srv.URL+"/metrics", nil, nil); r.code != 200 || !strings.Contains(r.body, "strata_registry_requests_total") {
		t.Fatalf("metrics: %d", r.code)
	}
}
