package registry_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

func newLimitedServer(t *testing.T, opts registry.Options) *httptest.Server {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(registry.Handler(registry.New(st, opts), registry.ServeConfig{Store: st}))
	t.Cleanup(srv.Close)
	return srv
}

// streamed sends body without a Content-Length (chunked).
func streamed(t *testing.T, method, url string, body []byte) resp {
	t.Helper()
	req, err := http.NewRequest(method, url, io.MultiReader(bytes.NewReader(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = -1
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return resp{r.StatusCode, r.Header, string(b)}
}

// TestMaxBlobSize: a blob past --max-blob-size is refused with 413 on
// every way of pushing it (monolithic, chunked with or without a length,
// in the closing PUT), and nothing of it stays; up to the limit pushes
// work as before. Before the limit, any size was stored.
func TestMaxBlobSize(t *testing.T) {
	srv := newLimitedServer(t, registry.Options{MaxBlobSize: 1000})
	exact := bytes.Repeat([]byte("a"), 1000)
	big := bytes.Repeat([]byte("b"), 1001)
	if r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/?digest="+digest.FromBytes(exact).String(), nil, exact); r.code != http.StatusCreated {
		t.Fatalf("blob of the limit's size: %d %s", r.code, r.body)
	}
	if r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/?digest="+digest.FromBytes(big).String(), nil, big); r.code != http.StatusRequestEntityTooLarge {
		t.Fatalf("monolithic blob past the limit: %d %s", r.code, r.body)
	}
	if r := streamed(t, "POST", srv.URL+"/v2/r/blobs/uploads/?digest="+digest.FromBytes(big).String(), big); r.code != http.StatusRequestEntityTooLarge {
		t.Fatalf("streamed monolithic blob past the limit: %d %s", r.code, r.body)
	}
	if r := do(t, "HEAD", srv.URL+"/v2/r/blobs/"+digest.FromBytes(big).String(), nil, nil); r.code != http.StatusNotFound {
		t.Fatalf("refused blob is visible: %d", r.code)
	}

	session := func() string {
		r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/", nil, nil)
		if r.code != http.StatusAccepted {
			t.Fatalf("start upload: %d %s", r.code, r.body)
		}
		return srv.URL + r.hdr.Get("Location")
	}
	// Chunks: 600 bytes, then 401 more (declared) is refused, the upload
	// keeps its 600 bytes and takes 400 more.
	loc := session()
	if r := do(t, "PATCH", loc, map[string]string{"Content-Range": "0-599"}, big[:600]); r.code != http.StatusAccepted {
		t.Fatalf("first chunk: %d %s", r.code, r.body)
	}
	if r := do(t, "PATCH", loc, map[string]string{"Content-Range": "600-1000"}, big[600:]); r.code != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunk past the limit: %d %s", r.code, r.body)
	}
	if r := streamed(t, "PATCH", loc, big[600:]); r.code != http.StatusRequestEntityTooLarge {
		t.Fatalf("streamed chunk past the limit: %d %s", r.code, r.body)
	}
	if r := do(t, "GET", loc, nil, nil); r.hdr.Get("Range") != "0-599" {
		t.Fatalf("after refused chunks the upload has Range %q, want 0-599", r.hdr.Get("Range"))
	}
	if r := do(t, "PUT", loc+"?digest="+digest.FromBytes(big).String(), map[string]string{"Content-Range": "600-1000"}, big[600:]); r.code != http.StatusRequestEntityTooLarge {
		t.Fatalf("closing PUT past the limit: %d %s", r.code, r.body)
	}
	b := append(bytes.Clone(big[:600]), exact[:400]...)
	if r := do(t, "PUT", loc+"?digest="+digest.FromBytes(b).String(), map[string]string{"Content-Range": "600-999"}, exact[:400]); r.code != http.StatusCreated {
		t.Fatalf("closing PUT up to the limit: %d %s", r.code, r.body)
	}
}

// TestUploadSessionsPerClient: one client may hold a bounded number of
// upload sessions open; ending one (commit or cancel) frees its place.
// Before, sessions were unbounded (each a directory and a file).
func TestUploadSessionsPerClient(t *testing.T) {
	srv := newLimitedServer(t, registry.Options{MaxUploadsPerClient: 3})
	var locs []string
	for range 3 {
		r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/", nil, nil)
		if r.code != http.StatusAccepted {
			t.Fatalf("session %d: %d %s", len(locs), r.code, r.body)
		}
		locs = append(locs, srv.URL+r.hdr.Get("Location"))
	}
	if r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/", nil, nil); r.code != http.StatusTooManyRequests || errorCode(t, r.body) != "TOOMANYREQUESTS" {
		t.Fatalf("a session past the limit: %d %s", r.code, r.body)
	}
	// Monolithic pushes and mounts open no session: still allowed.
	if r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/?digest="+digest.FromBytes([]byte("x")).String(), nil, []byte("x")); r.code != http.StatusCreated {
		t.Fatalf("monolithic push at the session limit: %d %s", r.code, r.body)
	}
	if r := do(t, "DELETE", locs[0], nil, nil); r.code != http.StatusNoContent {
		t.Fatalf("cancel: %d %s", r.code, r.body)
	}
	if r := do(t, "PUT", locs[1]+"?digest="+digest.FromBytes([]byte("y")).String(), nil, []byte("y")); r.code != http.StatusCreated {
		t.Fatalf("commit: %d %s", r.code, r.body)
	}
	for i := range 2 {
		if r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/", nil, nil); r.code != http.StatusAccepted {
			t.Fatalf("session %d after two ended: %d %s", i, r.code, r.body)
		}
	}
	if r := do(t, "POST", srv.URL+"/v2/r/blobs/uploads/", nil, nil); r.code != http.StatusTooManyRequests {
		t.Fatalf("past the limit again: %d", r.code)
	}
}

// TestSlowManifestRequestCut: a client that sends a manifest's body slowly
// is cut off after the request timeout. Before, only the headers had a
// deadline: the connection was held until the client gave up.
func TestSlowManifestRequestCut(t *testing.T) {
	srv := newLimitedServer(t, registry.Options{RequestTimeout: 300 * time.Millisecond})
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "PUT /v2/a/manifests/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n{")
	start := time.Now()
	closed := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, conn)
		closed <- err
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-closed:
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("cut after %v", d)
			}
			return
		case <-tick.C:
			conn.Write([]byte(" ")) // one byte at a time
			if time.Since(start) > 5*time.Second {
				t.Fatal("a slow manifest body held the connection for 5 s")
			}
		}
	}
}

// TestPageZeroHasNoLink: n=0 answers an empty list without a Link (a Link
// to the same empty page sent clients that follow Links round for ever;
// found by FuzzPage).
func TestPageZeroHasNoLink(t *testing.T) {
	srv := newLimitedServer(t, registry.Options{})
	pushBlob(t, srv.URL, "a", []byte("x"))
	m := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":1},"layers":[]}`, mtManifest, digest.FromBytes([]byte("x")))
	for _, tag := range []string{"t1", "t2"} {
		if r := do(t, "PUT", srv.URL+"/v2/a/manifests/"+tag, map[string]string{"Content-Type": mtManifest}, []byte(m)); r.code != 201 {
			t.Fatalf("push: %d %s", r.code, r.body)
		}
	}
	for _, path := range []string{"/v2/a/tags/list?n=0", "/v2/_catalog?n=0"} {
		r := do(t, "GET", srv.URL+path, nil, nil)
		if r.code != 200 || r.hdr.Get("Link") != "" || strings.Contains(r.body, "t1") || strings.Contains(r.body, `"repositories":["a"`) {
			t.Errorf("%s: %d Link %q %s", path, r.code, r.hdr.Get("Link"), r.body)
		}
	}
}
