package registry_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

// TestMetricsLabelsBounded: paths nobody routes do not become metric
// labels: 2,000 odd extension paths leave /metrics the size it was.
func TestMetricsLabelsBounded(t *testing.T) {
	srv := newServer(t)
	size := func() int {
		r := do(t, "GET", srv.URL+"/metrics", nil, nil)
		return strings.Count(r.body, "\n")
	}
	do(t, "GET", srv.URL+"/v2/_nothing/x", nil, nil)
	do(t, "GET", srv.URL+"/v2/app/_nothing/x", nil, nil)
	before := size()
	for i := range 2000 {
		do(t, "GET", srv.URL+"/v2/_odd"+strings.Repeat("x", i%50)+string(rune('a'+i%26))+"/y", nil, nil)
		do(t, "GET", srv.URL+"/v2/app/_odd"+strings.Repeat("y", i%50)+string(rune('a'+i%26))+"/y", nil, nil)
	}
	if after := size(); after > before+20 {
		t.Errorf("/metrics grew from %d to %d lines after 4,000 requests to unknown paths", before, after)
	}
	if r := do(t, "GET", srv.URL+"/metrics", nil, nil); strings.Contains(r.body, "_odd") {
		t.Error("/metrics holds text of request paths")
	}
}

// TestMonolithicUploadReadsBody: a monolithic POST ?digest=D stores the
// body it carries, verified against D, even when D already exists: a body
// that is not D's is refused, never answered 201 from what is stored.
func TestMonolithicUploadReadsBody(t *testing.T) {
	srv := newServer(t)
	d := pushBlob(t, srv.URL, "a", []byte("the secret blob"))
	r := do(t, "POST", srv.URL+"/v2/b/blobs/uploads/?digest="+d.String(), nil, []byte("anything else"))
	if r.code == http.StatusCreated {
		t.Fatalf("a monolithic upload of other bytes under an existing digest: %d", r.code)
	}
	if code := errorCode(t, r.body); code != "DIGEST_INVALID" {
		t.Errorf("error code %s, want DIGEST_INVALID", code)
	}
	if r := do(t, "GET", srv.URL+"/v2/b/blobs/"+d.String(), nil, nil); r.code != http.StatusNotFound {
		t.Errorf("repository b can read the blob after a lying upload: %d", r.code)
	}
	// The right bytes: linked.
	if r := do(t, "POST", srv.URL+"/v2/b/blobs/uploads/?digest="+d.String(), nil, []byte("the secret blob")); r.code != http.StatusCreated {
		t.Errorf("a monolithic upload of the right bytes: %d %s", r.code, r.body)
	}
}

// TestMountWithoutFrom: a cross-repository mount without from (or from a
// repository that lacks the blob) opens an upload session (202) instead of
// linking a blob of another repository by digest alone.
func TestMountWithoutFrom(t *testing.T) {
	srv := newServer(t)
	d := pushBlob(t, srv.URL, "a", []byte("a blob of a"))
	for _, q := range []string{"?mount=" + d.String(), "?mount=" + d.String() + "&from=c"} {
		r := do(t, "POST", srv.URL+"/v2/b/blobs/uploads/"+q, nil, nil)
		if r.code != http.StatusAccepted || r.hdr.Get("Location") == "" {
			t.Errorf("POST %s: %d, want 202 with an upload session", q, r.code)
		}
		if r := do(t, "HEAD", srv.URL+"/v2/b/blobs/"+d.String(), nil, nil); r.code != http.StatusNotFound {
			t.Errorf("after POST %s repository b has the blob: %d", q, r.code)
		}
	}
	if r := do(t, "POST", srv.URL+"/v2/b/blobs/uploads/?mount="+d.String()+"&from=a", nil, nil); r.code != http.StatusCreated {
		t.Errorf("a mount from the repository that has it: %d", r.code)
	}
}

// TestLongNames: names past the limits are 400 NAME_INVALID, not 500.
func TestLongNames(t *testing.T) {
	srv := newServer(t)
	long := strings.Repeat("a", 5400)
	for _, p := range []string{
		"/v2/" + long + "/tags/list",
		"/v2/" + long + "/manifests/latest",
		"/v2/" + long + "/blobs/" + digest.FromString("x").String(),
		"/v2/a/" + long + "/blobs/uploads/",
		"/v2/" + strings.Repeat("a/", 200) + "b/tags/list",
	} {
		method := "GET"
		if strings.HasSuffix(p, "/uploads/") {
			method = "POST"
		}
		r := do(t, method, srv.URL+p, nil, nil)
		if r.code != http.StatusBadRequest {
			t.Errorf("%s %.60s…: %d, want 400", method, p, r.code)
			continue
		}
		if code := errorCode(t, r.body); code != "NAME_INVALID" {
			t.Errorf("%.60s…: %s, want NAME_INVALID", p, code)
		}
	}
	// A tag past 128 characters is refused on push.
	r := do(t, "PUT", srv.URL+"/v2/a/manifests/"+strings.Repeat("t", 129), map[string]string{"Content-Type": mtManifest}, []byte("{}"))
	if r.code != http.StatusBadRequest {
		t.Errorf("a 129-character tag: %d, want 400", r.code)
	}
	io.Discard.Write(nil)
}

// TestIdleConnectionsClosed: keep-alive connections left idle are closed
// after the idle timeout, and no more than MaxConnections are served at
// once.
func TestIdleConnectionsClosed(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(st, registry.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := registry.ServeConfig{Store: st, IdleTimeout: 300 * time.Millisecond, MaxConnections: 4}
	go registry.Serve(ctx, ln, registry.Handler(reg, cfg), cfg)
	addr := ln.Addr().String()
	conns := make([]net.Conn, 4)
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
		conns[i] = c
	}
	// A fifth connection is not served while four are open.
	c5, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c5.Close()
	fmt.Fprintf(c5, "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
	c5.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	if n, _ := c5.Read(make([]byte, 1)); n > 0 {
		t.Error("a fifth connection was served beyond MaxConnections 4")
	}
	// The four idle ones are closed by the server after the idle timeout.
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("connection %d not closed by the server: %v (read %d bytes)", i, err, len(b))
		}
	}
	// Then the fifth is served.
	c5.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c5.Read(make([]byte, 1)); n == 0 {
		t.Errorf("the fifth connection was not served once the others closed: %v", err)
	}
}
