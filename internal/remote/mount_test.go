package remote_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
)

// The extension's handlers are stand-ins, mounted in the real registry so
// that its routing of /v2/<name>/_strata/… is what the client meets.

func TestMount(t *testing.T) {
	layer := digest.FromString("layer")
	good := api.MountDescriptor{
		Layer:   layer,
		DiffID:  digest.FromString("diff"),
		Version: 1,
		Index:   ocispec.Descriptor{MediaType: "application/vnd.strata.layer.index.v1", Digest: digest.FromString("index"), Size: 5},
		Data:    ocispec.Descriptor{MediaType: "application/vnd.strata.layer.data.v1", Digest: digest.FromString("data"), Size: 4},
	}
	serve := func(w http.ResponseWriter, md api.MountDescriptor) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(md)
	}
	tests := []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request, n int)
		wait    time.Duration // Options.MountWait
		want    error         // nil: success with good
		msg     string        // the *Error's message
		calls   int
	}{
		{name: "200", calls: 1, handler: func(w http.ResponseWriter, r *http.Request, n int) { serve(w, good) }},
		{name: "202 with Retry-After twice, then 200", calls: 3, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			if n <= 2 {
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(http.StatusAccepted)
				return
			}
			serve(w, good)
		}},
		{name: "202 without Retry-After, then 200", calls: 2, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			if n == 1 {
				w.WriteHeader(http.StatusAccepted)
				return
			}
			serve(w, good)
		}},
		{name: "202 for longer than MountWait", wait: 50 * time.Millisecond, want: remote.ErrExpanding, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			w.WriteHeader(http.StatusAccepted)
		}},
		{name: "503 is retried", calls: 2, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			if n == 1 {
				ociError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "busy")
				return
			}
			serve(w, good)
		}},
		{name: "404", calls: 1, want: remote.ErrNotFound, msg: "blob unknown to registry", handler: func(w http.ResponseWriter, r *http.Request, n int) {
			ociError(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown to registry")
		}},
		{name: "422", calls: 1, want: remote.ErrExpansionFailed, msg: "layer is not a tar archive", handler: func(w http.ResponseWriter, r *http.Request, n int) {
			ociError(w, http.StatusUnprocessableEntity, api.CodeExpansionFailed, "layer is not a tar archive")
		}},
		{name: "descriptor for another layer", calls: 1, want: remote.ErrInvalidResponse, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			md := good
			md.Layer = digest.FromString("other")
			serve(w, md)
		}},
		{name: "descriptor with a bad data digest", calls: 1, want: remote.ErrInvalidResponse, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			md := good
			md.Data.Digest = "sha256:nothex"
			serve(w, md)
		}},
		{name: "not JSON", calls: 1, want: remote.ErrInvalidResponse, handler: func(w http.ResponseWriter, r *http.Request, n int) {
			fmt.Fprint(w, "<html>")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			calls := 0
			ext := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				repo, rest := registry.RepoFromContext(r.Context())
				if r.Method != http.MethodPost || repo != "team/app" || rest != "layers/"+layer.String()+"/mount" {
					t.Errorf("extension got %s %s (repo %q, rest %q)", r.Method, r.URL.Path, repo, rest)
				}
				mu.Lock()
				calls++
				n := calls
				mu.Unlock()
				tt.handler(w, r, n)
			})
			srv := newRegistryServer(t, ext, nil)
			c := newClient(t, remote.Options{MountWait: tt.wait})
			md, err := c.Mount(context.Background(), parseRef(t, hostOf(srv)+"/team/app").Repository, layer)
			if tt.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(&good, md); diff != "" {
					t.Errorf("descriptor mismatch (-want +got):\n%s", diff)
				}
			} else {
				if !errors.Is(err, tt.want) {
					t.Fatalf("Mount = %v, want %v", err, tt.want)
				}
				t.Log(err)
				if tt.msg != "" {
					var re *remote.Error
					if !errors.As(err, &re) || re.Message() != tt.msg {
						t.Errorf("error %v does not carry the message %q", err, tt.msg)
					}
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if tt.calls > 0 && calls != tt.calls {
				t.Errorf("%d requests, want %d", calls, tt.calls)
			}
		})
	}
}

func TestInfo(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc // nil: no extension at all
		ok      bool
	}{
		{"versions", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"versions":[1,2]}`)
		}, true},
		{"no extension", nil, false},
		{"401 without a challenge", func(w http.ResponseWriter, r *http.Request) {
			ociError(w, http.StatusUnauthorized, "UNAUTHORIZED", "who are you")
		}, false},
		{"not JSON", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello") }, false},
		{"500 until the end", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusInternalServerError) }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ext http.Handler
			if tt.handler != nil {
				ext = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if repo, rest := registry.RepoFromContext(r.Context()); r.Method != http.MethodGet || repo != "" || rest != "info" {
						t.Errorf("extension got %s %s", r.Method, r.URL.Path)
					}
					tt.handler(w, r)
				})
			}
			srv := newRegistryServer(t, ext, nil)
			c := newClient(t, remote.Options{})
			info, ok, err := c.Info(context.Background(), hostOf(srv))
			if err != nil {
				t.Fatal(err)
			}
			if ok != tt.ok {
				t.Fatalf("Info ok = %v, want %v", ok, tt.ok)
			}
			if ok && !cmp.Equal(info, &api.Info{Versions: []int{1, 2}}) {
				t.Errorf("Info = %+v", info)
			}
		})
	}
	// An unreachable registry is an error, not a "no".
	c := newClient(t, remote.Options{Retry: remote.RetryPolicy{Attempts: 1}})
	if _, ok, err := c.Info(context.Background(), "127.0.0.1:1"); ok || err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("Info(closed port) = %v, %v", ok, err)
	}
}
