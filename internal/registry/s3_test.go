package registry_test

import (
	"context"
	"fmt"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/s3test"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/internal/store/s3store"
)

// TestS3Blobs: a registry on S3 (SeaweedFS) takes a chunked push of a
// blob of several parts, serves ranges of it (or redirects to the object
// store), and answers 503 with Retry-After when the store stops
// answering, storing nothing.
func TestS3Blobs(t *testing.T) {
	srv := s3test.Start(t)
	srv.SetEnv(t)
	bucket := srv.Bucket(t)
	open := func(redirect bool) *httptest.Server {
		d, err := s3store.Open(context.Background(), s3store.Options{Bucket: bucket, Endpoint: srv.Endpoint, PathStyle: true, PartSize: s3store.MinPartSize})
		if err != nil {
			t.Fatal(err)
		}
		st, err := store.OpenDriver(d, store.Options{LocalDir: t.TempDir(), Redirect: redirect})
		if err != nil {
			t.Fatal(err)
		}
		h := httptest.NewServer(registry.Handler(registry.New(st, registry.Options{}), registry.ServeConfig{Store: st}))
		t.Cleanup(h.Close)
		return h
	}
	direct, redirecting := open(false), open(true)

	blob := make([]byte, 11<<20+321)
	rand.New(rand.NewSource(1)).Read(blob)
	d := digest.FromBytes(blob)
	r := do(t, "POST", direct.URL+"/v2/lib/app/blobs/uploads/", nil, nil)
	if r.code != http.StatusAccepted {
		t.Fatalf("POST: %d %s", r.code, r.body)
	}
	loc := r.hdr.Get("Location")
	for off := 0; off < len(blob); off += 3 << 20 {
		end := min(off+3<<20, len(blob))
		r = do(t, "PATCH", direct.URL+loc, map[string]string{
			"Content-Type": "application/octet-stream", "Content-Range": fmt.Sprintf("%d-%d", off, end-1),
		}, blob[off:end])
		if r.code != http.StatusAccepted {
			t.Fatalf("PATCH %d: %d %s", off, r.code, r.body)
		}
		loc = r.hdr.Get("Location")
	}
	if r = do(t, "PUT", direct.URL+loc+"?digest="+d.String(), nil, nil); r.code != http.StatusCreated {
		t.Fatalf("PUT: %d %s", r.code, r.body)
	}

	url := "/v2/lib/app/blobs/" + d.String()
	r = do(t, "GET", direct.URL+url, map[string]string{"Range": "bytes=5242000-6291455"}, nil)
	if r.code != http.StatusPartialContent || r.body != string(blob[5242000:6291456]) {
		t.Fatalf("ranged GET: %d, %d bytes", r.code, len(r.body))
	}
	if cc := r.hdr.Get("Cache-Control"); cc != "max-age=31536000, immutable" {
		t.Errorf("Cache-Control %q", cc)
	}
	if r = do(t, "GET", direct.URL+url, nil, nil); r.code != http.StatusOK || r.body != string(blob) {
		t.Fatalf("GET: %d, %d bytes", r.code, len(r.body))
	}

	// Redirected: 307 to a presigned GET, which serves ranges too.
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(redirecting.URL + url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	to := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || !strings.HasPrefix(to, srv.Endpoint+"/") {
		t.Fatalf("redirecting GET: %d to %q", resp.StatusCode, to)
	}
	r = do(t, "GET", redirecting.URL+url, map[string]string{"Range": "bytes=100-199"}, nil)
	if r.code != http.StatusPartialContent || r.body != string(blob[100:200]) {
		t.Fatalf("ranged GET through the redirect: %d %q", r.code, r.body)
	}
	if cc := r.hdr.Get("Cache-Control"); cc != "max-age=31536000, immutable" {
		t.Errorf("Cache-Control of the object store's answer %q", cc)
	}
	if r = do(t, "HEAD", redirecting.URL+url, nil, nil); r.code != http.StatusOK || r.hdr.Get("Content-Length") != fmt.Sprint(len(blob)) {
		t.Fatalf("HEAD: %d %v", r.code, r.hdr)
	}
	if r = do(t, "GET", redirecting.URL+"/v2/other/blobs/"+d.String(), nil, nil); r.code != http.StatusNotFound {
		t.Fatalf("GET from a repository without the blob: %d", r.code)
	}

	// A session open when the store stops answering.
	r = do(t, "POST", direct.URL+"/v2/lib/app/blobs/uploads/", nil, nil)
	loc = r.hdr.Get("Location")
	srv.Stop()
	for _, c := range []struct {
		method, url string
		body        []byte
	}{
		{"GET", direct.URL + url, nil},
		{"HEAD", direct.URL + url, nil},
		{"GET", redirecting.URL + url, nil},
		{"POST", direct.URL + "/v2/lib/app/blobs/uploads/", nil},
		{"PATCH", direct.URL + loc, []byte("more bytes")},
		{"POST", direct.URL + "/v2/lib/app/blobs/uploads/?digest=" + digest.FromString("x").String(), []byte("x")},
		{"GET", direct.URL + "/v2/lib/app/tags/list", nil},
	} {
		r := do(t, c.method, c.url, nil, c.body)
		if r.code != http.StatusServiceUnavailable || r.hdr.Get("Retry-After") == "" {
			t.Errorf("%s %s with the store down: %d (Retry-After %q) %s", c.method, c.url, r.code, r.hdr.Get("Retry-After"), r.body)
		}
	}
}
