package remote

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// FuzzRegistryAnswers serves arbitrary bytes, under a chosen status and
// Content-Type/Content-Encoding, as a hostile registry's answers to what
// a node asks of strata's extension: the layer-mount answer, the index
// route (zstd or not) and the start-up profile. Oracles: no panic, and an
// answer the client accepts is consistent (an index whose digest is the
// bytes', a mount descriptor for the layer asked). The seeds run in every
// `go test`; to search:
//
//	go test -run '^$' -fuzz '^FuzzRegistryAnswers$' -fuzztime 60s ./internal/remote/
func FuzzRegistryAnswers(f *testing.F) {
	layer := digest.FromString("layer")
	f.Add(200, "application/json", "", []byte(`{"layer":"`+layer.String()+`","diffID":"`+layer.String()+`","version":1,"index":{"mediaType":"x","digest":"`+layer.String()+`","size":5},"data":{"mediaType":"y","digest":"`+layer.String()+`","size":1}}`))
	f.Add(200, "application/json", "", []byte(`{"version":1,"layers":[{"layer":"`+layer.String()+`","data":"`+layer.String()+`","frames":[0,1,-5],"ranges":[[0,1]]}],"pack":{"digest":"sha256:00","size":-1,"spans":[[9,9,9]]}}`))
	f.Add(200, "application/vnd.strata.layer.index.v1", "zstd", []byte("\x28\xb5\x2f\xfd\x00\x58\x00\x00"))
	f.Add(202, "application/json", "", []byte(`{"errors":[{"code":"EXPANSION_PENDING"}]}`))
	f.Add(422, "application/json", "", []byte(`{"errors":[{"code":"EXPANSION_FAILED","message":"`+strings.Repeat("x", 10000)+`"}]}`))
	f.Fuzz(func(t *testing.T, status int, contentType, encoding string, body []byte) {
		if status < 200 || status > 599 {
			status = 200
		}
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if contentType != "" {
				w.Header().Set("Content-Type", contentType)
			}
			if encoding != "" {
				w.Header().Set("Content-Encoding", encoding)
			}
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(status)
			w.Write(body)
		}))
		defer srv.Close()
		c := New(Options{Hosts: PlainHosts(IsLoopback), Retry: RetryPolicy{Attempts: 1}, MountWait: 10 * time.Millisecond})
		repo := Repository{Registry: strings.TrimPrefix(srv.URL, "http://"), Name: "app"}
		ctx := context.Background()
		if md, err := c.Mount(ctx, repo, layer); err == nil && md.Layer != layer {
			t.Fatalf("a mount answer for layer %s accepted for %s", md.Layer, layer)
		}
		if d, raw, err := c.LayerIndex(ctx, repo, layer); err == nil && digest.FromBytes(raw) != d {
			t.Fatalf("index accepted under digest %s, its bytes are %s", d, digest.FromBytes(raw))
		}
		c.Profile(ctx, repo, layer)
	})
}
