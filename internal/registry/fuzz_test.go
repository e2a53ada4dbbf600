package registry_test

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

// FuzzHandler throws arbitrary requests (method, path and query, a header,
// a body) at the registry over a store, as a hostile client would: the
// route parser, names, digests, Content-Range, pagination, manifests and
// uploads. Oracles: no panic, no 5xx (an internal error is a bug here:
// the store is healthy), and nothing written outside the store's root.
// The seeds run in every `go test`; to search:
//
//	go test -run '^$' -fuzz '^FuzzHandler$' -fuzztime 60s ./internal/registry/
func FuzzHandler(f *testing.F) {
	for _, s := range []struct{ method, target, header, body string }{
		{"GET", "/v2/", "", ""},
		{"GET", "/v2/_catalog?n=2&last=a", "", ""},
		{"GET", "/v2/a/b/tags/list?n=-1", "", ""},
		{"PUT", "/v2/a/manifests/t", "Content-Type: application/vnd.oci.image.manifest.v1+json", `{"schemaVersion":2,"config":{"digest":"sha256:` + strings.Repeat("0", 64) + `","size":2},"layers":[]}`},
		{"POST", "/v2/a/blobs/uploads/?digest=sha256:" + strings.Repeat("a", 64), "", "x"},
		{"POST", "/v2/a/blobs/uploads/?mount=sha256:" + strings.Repeat("a", 64) + "&from=b", "", ""},
		{"PATCH", "/v2/a/blobs/uploads/" + strings.Repeat("0", 32), "Content-Range: 5-1", "xx"},
		{"GET", "/v2/a/../b/manifests/x", "", ""},
		{"GET", "/v2/a%2fb/blobs/sha256:zz", "", ""},
		{"DELETE", "/v2/a/manifests/sha512:" + strings.Repeat("f", 128), "", ""},
		{"GET", "/v2/a/referrers/sha256:" + strings.Repeat("1", 64) + "?artifactType=%ff", "", ""},
		{"HEAD", "/v2/" + strings.Repeat("a/", 200) + "manifests/t", "", ""},
	} {
		f.Add(s.method, s.target, s.header, []byte(s.body))
	}
	root := f.TempDir()
	st, err := store.Open(filepath.Join(root, "store"))
	if err != nil {
		f.Fatal(err)
	}
	h := registry.Handler(registry.New(st, registry.Options{}), registry.ServeConfig{Store: st, Metrics: registry.NewMetrics()})
	f.Fuzz(func(t *testing.T, method, target string, header string, body []byte) {
		if !strings.HasPrefix(target, "/") {
			target = "/v2/" + target
		}
		req, err := http.NewRequest(method, "http://registry"+target, bytes.NewReader(body))
		if err != nil {
			return // not a request a server could receive
		}
		if k, v, ok := strings.Cut(header, ":"); ok && k != "" {
			req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%s %s (%q): %d %s", method, target, header, rec.Code, rec.Body.String())
		}
		ents, _ := os.ReadDir(root)
		if len(ents) != 1 {
			t.Fatalf("files outside the store's root: %v", ents)
		}
	})
}
