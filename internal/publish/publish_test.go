package publish_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/crypto/bcrypt"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/publish"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// Tests against strata's registry on a real socket: with its expansion
// service (the reference the bytes must match), and as a plain OCI
// registry without the Referrers API (its route answers 404, as the CNCF
// distribution registry's does; integration/expand_test.go runs that
// one), or requiring credentials.

type reg struct {
	base, host string
}

func newRegistry(t *testing.T, expansion, noReferrersAPI bool, users registry.Users) reg {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts := registry.Options{}
	var svc *expand.Service
	if expansion {
		if svc, err = expand.New(st, expand.Options{}); err != nil {
			t.Fatal(err)
		}
		opts.OnManifest = svc.OnManifest
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { svc.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	r := registry.New(st, opts)
	var h http.Handler = r
	if noReferrersAPI {
		h = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if strings.Contains(req.URL.Path, "/referrers/") {
				http.NotFound(w, req)
				return
			}
			r.ServeHTTP(noSubject{w}, req)
		})
	}
	if users != nil {
		h = registry.RequireAuth(h, users, true)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return reg{srv.URL, srv.Listener.Addr().String()}
}

// noSubject drops the OCI-Subject header, which only a registry with the
// Referrers API sends.
type noSubject struct{ http.ResponseWriter }

func (w noSubject) WriteHeader(code int) {
	w.Header().Del("OCI-Subject")
	w.ResponseWriter.WriteHeader(code)
}

func do(t *testing.T, method, url, contentType string, body []byte, want int) []byte {
	t.Helper()
	req, _ := http.NewRequest(method, url, bytes.NewReader(body))
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
		req.Header.Set("Accept", contentType)
	}
	req.SetBasicAuth("admin", "secret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("%s %s: %s %s", method, url, resp.Status, b)
	}
	return b
}

// pushImage pushes an image of n small gzip layers to repo:tag and returns
// its manifest's descriptor.
func pushImage(t *testing.T, base, repo, tag string, n int) ocispec.Descriptor {
	t.Helper()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	man.SchemaVersion = 2
	for i := range n {
		tarball, err := ocilayout.Tar([]ocilayout.Entry{
			{Name: "etc/", Type: '5'},
			{Name: fmt.Sprintf("etc/f%d", i), Content: bytes.Repeat([]byte(fmt.Sprintf("layer %d\n", i)), 5000)},
		})
		if err != nil {
			t.Fatal(err)
		}
		l := ocilayout.GzipLayer(tarball)
		d := digest.FromBytes(l.Blob)
		do(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+d.String(), "", l.Blob, http.StatusCreated)
		man.Layers = append(man.Layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: d, Size: int64(len(l.Blob))})
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
	}
	cb, _ := json.Marshal(cfg)
	do(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+digest.FromBytes(cb).String(), "", cb, http.StatusCreated)
	man.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))}
	mb, _ := json.Marshal(man)
	do(t, "PUT", base+"/v2/"+repo+"/manifests/"+tag, ocispec.MediaTypeImageManifest, mb, http.StatusCreated)
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb))}
}

// referrers lists the referrers of m in repo, with the API or else the tag.
func referrers(t *testing.T, r reg, repo string, m digest.Digest) []ocispec.Descriptor {
	t.Helper()
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	descs, err := c.Referrers(context.Background(), remote.Repository{Registry: r.host, Name: repo}, m, api.ArtifactTypeExpansion)
	if err != nil {
		t.Fatal(err)
	}
	return descs
}

func open(t *testing.T, r reg, repo string, creds remote.CredentialFunc) *publish.Repo {
	t.Helper()
	p, err := publish.Open(remote.Repository{Registry: r.host, Name: repo}, publish.Options{Hosts: remote.PlainHosts(remote.IsLoopback), Credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestExpand: strata expand's artifact is byte for byte the one strata's
// registry publishes for the same image (so the same digest), through the
// Referrers API and through the referrers tag; a second run pushes
// nothing.
func TestExpand(t *testing.T) {
	ctx := context.Background()
	ref := newRegistry(t, true, false, nil)
	m := pushImage(t, ref.base, "app", "v1", 3)
	var want []ocispec.Descriptor
	for deadline := time.Now().Add(20 * time.Second); len(want) == 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("strata's registry published no expansion artifact")
		}
		want = referrers(t, ref, "app", m.Digest)
	}

	for _, noAPI := range []bool{false, true} {
		t.Run(fmt.Sprintf("no Referrers API %v", noAPI), func(t *testing.T) {
			plain := newRegistry(t, false, noAPI, nil)
			if got := pushImage(t, plain.base, "app", "v1", 3); got.Digest != m.Digest {
				t.Fatalf("image pushed as %s and %s", m.Digest, got.Digest)
			}
			var events []publish.Event
			sum, err := publish.Expand(ctx, open(t, plain, "app", nil), "v1", publish.ExpandOptions{TempDir: t.TempDir(), Progress: func(e publish.Event) { events = append(events, e) }})
			if err != nil {
				t.Fatal(err)
			}
			if sum.Expanded != 3 || sum.Already != 0 || sum.Artifacts != 1 || sum.Manifests != 1 || sum.DataBytes == 0 || sum.IndexBytes == 0 || sum.ReferrersTag != noAPI {
				t.Errorf("first run: %+v", sum)
			}
			if n := countSteps(events, publish.StepPushed); n != 3 {
				t.Errorf("%d layers reported pushed, want 3", n)
			}
			got := referrers(t, plain, "app", m.Digest)
			if len(got) != 1 || got[0].Digest != want[0].Digest {
				t.Fatalf("artifacts %v, want strata's registry's %s", got, want[0].Digest)
			}
			sum, err = publish.Expand(ctx, open(t, plain, "app", nil), "v1", publish.ExpandOptions{TempDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			if sum.Expanded != 0 || sum.Already != 3 || sum.Artifacts != 0 || sum.DataBytes != 0 {
				t.Errorf("second run: %+v, want nothing pushed", sum)
			}
		})
	}
}

func countSteps(events []publish.Event, step string) int {
	n := 0
	for _, e := range events {
		if e.Step == step {
			n++
		}
	}
	return n
}

// TestExpandRefused: a registry that refuses pushes (credentials missing)
// is a clear error that names it, and no artifact appears.
func TestExpandRefused(t *testing.T) {
	hash, _ := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost)
	r := newRegistry(t, false, true, registry.Users{"admin": hash})
	m := pushImage(t, r.base, "app", "v1", 2)
	_, err := publish.Expand(context.Background(), open(t, r, "app", nil), "v1", publish.ExpandOptions{TempDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "refused") || !strings.Contains(err.Error(), r.host+"/app") {
		t.Fatalf("expand without credentials: %v, want a refusal naming the repository", err)
	}
	if got := referrers(t, r, "app", m.Digest); len(got) != 0 {
		t.Errorf("artifacts %v after a refused push", got)
	}
	creds := func(context.Context, string) (remote.Credential, error) {
		return remote.Credential{Username: "admin", Password: "secret"}, nil
	}
	sum, err := publish.Expand(context.Background(), open(t, r, "app", creds), "v1", publish.ExpandOptions{TempDir: t.TempDir()})
	if err != nil || sum.Artifacts != 1 {
		t.Fatalf("expand with credentials: %+v, %v", sum, err)
	}
}

// TestPushProfile: a profile pushed as a referrer is what a node finds,
// with and without the Referrers API.
func TestPushProfile(t *testing.T) {
	ctx := context.Background()
	for _, noAPI := range []bool{false, true} {
		r := newRegistry(t, false, noAPI, nil)
		m := pushImage(t, r.base, "app", "v1", 1)
		p := api.Profile{Version: 1, Layers: []api.ProfileLayer{{Layer: m.Digest, Frames: []int{0, 3}}}}
		b, _ := json.Marshal(p)
		if _, err := open(t, r, "app", nil).PushProfile(ctx, m, b); err != nil {
			t.Fatal(err)
		}
		c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
		got, err := c.ProfileReferrer(ctx, remote.Repository{Registry: r.host, Name: "app"}, m.Digest)
		if err != nil || len(got.Layers) != 1 || len(got.Layers[0].Frames) != 2 {
			t.Errorf("no Referrers API %v: profile %+v, %v", noAPI, got, err)
		}
	}
}
