package node_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

// TestHugeIndexRefused: a registry whose index route fails and whose
// layer-mount answer names an index of a gigabyte, served endlessly. The
// node read such an index whole into memory (io.ReadAll: the daemon grew to
// 870 MB in the issue); now it refuses it by the size named, reading none
// of it, and pulls the layers whole.
func TestHugeIndexRefused(t *testing.T) {
	st, err := store.Open(t.TempDir())
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
	t.Cleanup(func() { cancel(); <-done })
	reg := registry.New(st, registry.Options{OnManifest: svc.OnManifest})
	reg.Extension(api.Extension, svc.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
	const huge = 1 << 30
	var indexes = map[string]bool{}
	var served atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.Contains(r.URL.Path, "/_strata/") && strings.HasSuffix(r.URL.Path, "/index"):
			http.Error(w, `{"errors":[{"code":"UNSUPPORTED"}]}`, http.StatusNotFound)
		case strings.Contains(r.URL.Path, "/_strata/") && r.Method == http.MethodPost:
			rec := httptest.NewRecorder()
			reg.ServeHTTP(rec, r)
			var md api.MountDescriptor
			if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &md) != nil {
				w.WriteHeader(rec.Code)
				w.Write(rec.Body.Bytes())
				return
			}
			indexes[md.Index.Digest.String()] = true
			md.Index.Size = huge
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(md)
		case strings.Contains(r.URL.Path, "/blobs/") && indexes[r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]:
			w.Header().Set("Content-Length", "1073741824")
			zeros := make([]byte, 1<<20)
			for range huge / len(zeros) {
				n, err := w.Write(zeros)
				served.Add(int64(n))
				if err != nil {
					return
				}
			}
		default:
			reg.ServeHTTP(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	host := srv.Listener.Addr().String()
	pushImage(t, srv.URL, "app", "v1", 2)
	m := openNode(t, t.TempDir(), newFakeMounter(), node.Options{})
	defer m.Close(context.Background())
	img, err := m.Pull(context.Background(), host+"/app:v1")
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if img.Mode == node.ModeLazy {
		t.Errorf("pulled lazily with a hostile index: %+v", img)
	}
	if n := served.Load(); n > 0 {
		t.Errorf("the node read %d bytes of an index named a gigabyte", n)
	}
}
