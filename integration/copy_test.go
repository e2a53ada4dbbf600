package integration

import (
	"bytes"
	"context"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/publish"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/testimage"
)

// Versions of the copying clients built from the Go module proxy.
const (
	craneModule  = "github.com/google/go-containerregistry/cmd/crane"
	craneVersion = "v0.22.1"
	orasModule   = "oras.land/oras/cmd/oras"
	orasVersion  = "v1.3.6"
	regctlModule = "github.com/regclient/regclient/cmd/regctl"
	// regctlVersion: v0.11.7 builds in about 10 s from a warm module cache.
	regctlVersion = "v0.11.7"
)

// TestCopy records what each copying client carries of an image's
// referrers, strata's expansion and start-up profile artifacts, from one
// strata registry to another, from strata to the CNCF distribution
// registry (which has no Referrers API: referrers live under its referrers
// tag sha256-<hex>) and back, so that a change in a client's behaviour is
// noticed. docs/copying.md shows the table.
//
// A client "carries" an artifact when it pushes the source's artifact
// manifest to the target (a recording proxy in front of each target sees
// the pushes); what a node then finds there ("listed": the Referrers API,
// or the referrers tag) also holds, on a strata target, the expansion the
// target made itself, which is the same artifact, digest for digest.
func TestCopy(t *testing.T) {
	copiers := copyTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// The sources: an image in a strata registry, its expansion published
	// by that registry, and a start-up profile pushed as an artifact; the
	// same image in the distribution registry, expanded there with
	// `strata expand` (the referrers tag) and given the same profile.
	src := startRegistry(t)
	ref := busyboxImage(t, src)
	dist := startDistribution(t)
	distRef := dist + "/src/busybox:latest"
	run(t, ctx, "skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", "docker://"+ref, "docker://"+distRef)
	run(t, ctx, strataBin, "expand", "--plain-http", distRef)

	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	r, _ := remote.ParseReference(ref)
	img, err := c.Resolve(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	subject := ocispec.Descriptor{MediaType: img.Manifest.MediaType, Digest: img.Digest, Size: int64(len(img.RawManifest))}
	if subject.MediaType == "" {
		subject.MediaType = ocispec.MediaTypeImageManifest
	}
	profile := []byte(`{"version":1,"layers":[]}`)
	var profileArtifact digest.Digest
	for _, s := range []string{ref, distRef} {
		sr, _ := remote.ParseReference(s)
		repo, err := publish.Open(sr.Repository, publish.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
		if err != nil {
			t.Fatal(err)
		}
		d, err := repo.PushProfile(ctx, subject, profile)
		if err != nil {
			t.Fatal(err)
		}
		profileArtifact = d.Digest
	}
	// artifacts lists, by artifact type, the referrers of the image a node
	// finds in repository ref names.
	artifacts := func(ref string) map[string]digest.Digest {
		t.Helper()
		r, err := remote.ParseReference(ref)
		if err != nil {
			t.Fatal(err)
		}
		descs, err := c.Referrers(ctx, r.Repository, img.Digest, "")
		if err != nil {
			t.Fatalf("referrers in %s: %v", r.Repository, err)
		}
		out := map[string]digest.Digest{}
		for _, d := range descs {
			if prev, ok := out[d.ArtifactType]; ok && prev != d.Digest {
				t.Errorf("referrers in %s: two %s artifacts, %s and %s", r.Repository, d.ArtifactType, prev, d.Digest)
			}
			out[d.ArtifactType] = d.Digest
		}
		return out
	}
	var srcExpansion digest.Digest
	for deadline := time.Now().Add(30 * time.Second); srcExpansion == ""; time.Sleep(100 * time.Millisecond) {
		srcExpansion = artifacts(ref)[api.ArtifactTypeExpansion]
		if time.Now().After(deadline) {
			t.Fatal("no expansion artifact in the source strata registry")
		}
	}
	want := map[string]digest.Digest{api.ArtifactTypeExpansion: srcExpansion, api.ArtifactTypeProfile: profileArtifact}
	for _, s := range []string{ref, distRef} {
		if got := artifacts(s); !maps.Equal(got, want) {
			t.Fatalf("the source %s has referrers %v, want %v (strata expand makes the artifact strata's registry makes)", s, got, want)
		}
	}
	byDigest := map[digest.Digest]string{srcExpansion: api.ArtifactTypeExpansion, profileArtifact: api.ArtifactTypeProfile}

	dst := startRegistry(t)
	targets := map[string]*pushRecorder{"strata": recordPushes(t, dst.Addr), "distribution": recordPushes(t, dist)}
	sources := map[string]string{"strata": ref, "distribution": distRef}
	const (
		exp  = api.ArtifactTypeExpansion
		prof = api.ArtifactTypeProfile
	)
	for _, tc := range []struct {
		client, from, to string
		// carried: the source's artifacts the client pushes to the target.
		carried []string
		// listed: the artifacts a node finds in the target (on a strata
		// target, once it has expanded the image itself).
		listed []string
		// tag: on the distribution registry, whether the client keeps the
		// referrers tag.
		tag bool
	}{
		{"skopeo copy --all", "strata", "strata", nil, []string{exp}, false},
		{"skopeo copy --all", "strata", "distribution", nil, nil, false},
		{"skopeo copy --all", "distribution", "strata", nil, []string{exp}, false},
		{"crane copy", "strata", "strata", nil, []string{exp}, false},
		{"crane copy", "strata", "distribution", nil, nil, false},
		{"crane copy", "distribution", "strata", nil, []string{exp}, false},
		{"oras cp -r", "strata", "strata", []string{exp, prof}, []string{exp, prof}, false},
		{"oras cp -r", "strata", "distribution", []string{exp, prof}, []string{exp, prof}, true},
		{"oras cp -r", "distribution", "strata", []string{exp, prof}, []string{exp, prof}, false},
		{"regctl image copy --referrers", "strata", "strata", []string{exp, prof}, []string{exp, prof}, false},
		{"regctl image copy --referrers", "strata", "distribution", []string{exp, prof}, []string{exp, prof}, true},
		{"regctl image copy --referrers", "distribution", "strata", []string{exp, prof}, []string{exp, prof}, false},
	} {
		t.Run(tc.client+" "+tc.from+" to "+tc.to, func(t *testing.T) {
			rec := targets[tc.to]
			repo := strings.Fields(tc.client)[0] + "/from-" + tc.from
			to := rec.Addr + "/" + repo + ":latest"
			copiers[strings.Fields(tc.client)[0]](t, ctx, sources[tc.from], to)

			// The image keeps its digest, or no referrer would apply.
			if !slices.ContainsFunc(rec.pushes(repo), func(p manifestPut) bool { return p.Digest == img.Digest }) {
				t.Errorf("the image manifest %s was not pushed as it is: %v", img.Digest, rec.pushes(repo))
			}
			var carried []string
			for _, p := range rec.pushes(repo) {
				if typ, ok := byDigest[p.Digest]; ok {
					carried = append(carried, typ)
				}
			}
			slices.Sort(carried)
			carried = slices.Compact(carried)
			if !slices.Equal(carried, tc.carried) {
				t.Errorf("carried %v, want %v", carried, tc.carried)
			}
			// What a node finds there: the Referrers API or the referrers
			// tag; a strata target expands the image itself.
			target := rec.Target + "/" + repo
			got := artifacts(target)
			for deadline := time.Now().Add(30 * time.Second); tc.to == "strata" && len(got) < len(tc.listed) && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				got = artifacts(target)
			}
			var listed []string
			for typ, d := range got {
				listed = append(listed, typ)
				if d != want[typ] {
					t.Errorf("the target's %s artifact is %s, the source's %s", typ, d, want[typ])
				}
			}
			slices.Sort(listed)
			if !slices.Equal(listed, tc.listed) {
				t.Errorf("listed in the target: %v, want %v", listed, tc.listed)
			}
			if tc.to == "distribution" {
				tagged := slices.ContainsFunc(rec.pushes(repo), func(p manifestPut) bool { return p.Ref == remote.ReferrersTag(img.Digest) })
				if tagged != tc.tag {
					t.Errorf("referrers tag pushed: %v, want %v", tagged, tc.tag)
				}
			}
			// A strata registry given a profile artifact serves that
			// profile on its profile route.
			if tc.to == "strata" && slices.Contains(tc.listed, prof) {
				if p, err := c.Profile(ctx, remote.Repository{Registry: dst.Addr, Name: repo}, img.Digest); err != nil || p.Version != 1 || len(p.Layers) != 0 {
					t.Errorf("profile route: %+v, %v", p, err)
				}
			}
			t.Logf("carried %v; listed %v", carried, listed)
		})
	}
}

// copyTools returns, by the first word of its command, a function that
// copies an image with each client, with its referrers where the client
// can. The clients built from the Go module proxy are built once, into the
// test cache.
func copyTools(t *testing.T) map[string]func(t *testing.T, ctx context.Context, from, to string) {
	t.Helper()
	testenv.RequireTool(t, "skopeo")
	crane := goTool(t, craneModule, craneVersion)
	oras := goTool(t, orasModule, orasVersion)
	regctl := goTool(t, regctlModule, regctlVersion)
	regctlConfig := filepath.Join(t.TempDir(), "regctl.json")
	return map[string]func(t *testing.T, ctx context.Context, from, to string){
		"skopeo": func(t *testing.T, ctx context.Context, from, to string) {
			run(t, ctx, "skopeo", "copy", "-q", "--all", "--src-tls-verify=false", "--dest-tls-verify=false", "docker://"+from, "docker://"+to)
		},
		"crane": func(t *testing.T, ctx context.Context, from, to string) {
			run(t, ctx, crane, "copy", "--insecure", from, to)
		},
		"oras": func(t *testing.T, ctx context.Context, from, to string) {
			run(t, ctx, oras, "cp", "-r", "--from-plain-http", "--to-plain-http", from, to)
		},
		"regctl": func(t *testing.T, ctx context.Context, from, to string) {
			t.Helper()
			args := []string{"image", "copy", "--referrers", from, to}
			for _, ref := range []string{from, to} {
				args = append([]string{"--host", "reg=" + strings.Split(ref, "/")[0] + ",tls=disabled"}, args...)
			}
			cmd := exec.CommandContext(ctx, regctl, args...)
			cmd.Env = append(os.Environ(), "REGCTL_CONFIG="+regctlConfig)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("regctl %s: %v\n%s", strings.Join(args, " "), err, tail(string(out), 4000))
			}
		},
	}
}

// A manifestPut is a manifest pushed through a pushRecorder: the reference
// it was pushed to (a digest or a tag) and its digest.
type manifestPut struct {
	Ref    string
	Digest digest.Digest
}

// A pushRecorder is a reverse proxy in front of a registry (Target) at
// Addr that records the manifests pushed through it that the registry
// accepted, by repository.
type pushRecorder struct {
	Addr, Target string
	mu           sync.Mutex
	puts         map[string][]manifestPut
}

func recordPushes(t *testing.T, target string) *pushRecorder {
	t.Helper()
	u := &url.URL{Scheme: "http", Host: target}
	rec := &pushRecorder{Target: target, puts: map[string][]manifestPut{}}
	// The Host header stays the proxy's, so that the absolute upload
	// locations the distribution registry sends lead back through it.
	proxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(u); r.Out.Host = r.In.Host }}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		repo, ref, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/manifests/")
		if r.Method != http.MethodPut || !ok {
			proxy.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		sw := &statusRecorder{ResponseWriter: w}
		proxy.ServeHTTP(sw, r)
		if sw.code == http.StatusCreated {
			rec.mu.Lock()
			rec.puts[repo] = append(rec.puts[repo], manifestPut{Ref: ref, Digest: digest.FromBytes(body)})
			rec.mu.Unlock()
		}
	}))
	t.Cleanup(srv.Close)
	rec.Addr = strings.TrimPrefix(srv.URL, "http://")
	return rec
}

// pushes returns the manifests pushed to repo.
func (p *pushRecorder) pushes(repo string) []manifestPut {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.puts[repo])
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

// goTool builds a command from the Go module proxy (pkg@version) once,
// into the test cache, and returns its path.
func goTool(t *testing.T, pkg, version string) string {
	t.Helper()
	name := filepath.Base(pkg)
	dir := filepath.Join(testimage.DefaultCacheDir, "bin", name+"-"+version)
	bin := filepath.Join(dir, name)
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	os.MkdirAll(dir, 0o755)
	install := exec.CommandContext(ctx, "go", "install", pkg+"@"+version)
	install.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod")
	install.Dir = dir
	if out, err := install.CombinedOutput(); err != nil {
		testenv.Unavailable(t, "cannot build "+pkg+": "+err.Error()+"\n"+tail(string(out), 2000))
	}
	return bin
}
