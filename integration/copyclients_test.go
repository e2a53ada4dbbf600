package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/testimage"
	"github.com/strata-oci/strata/layerindex"
)

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

// TestCopyClients records what each copying client carries of an image's
// referrers (strata's expansion and start-up profile artifacts) between
// strata's registry and the CNCF distribution registry (no Referrers API),
// so that a change in a client's behaviour is noticed; docs/registries.md
// shows the table.
func TestCopyClients(t *testing.T) {
	testenv.RequireTool(t, "skopeo")
	oras := goTool(t, "oras.land/oras/cmd/oras", "v1.3.6")
	crane := goTool(t, "github.com/google/go-containerregistry/cmd/crane", "v0.22.1")
	layout, _ := busyboxLayout(t)
	src := startRegistry(t)
	dist := startDistribution(t)
	dst := startRegistry(t)
	ref := src.Addr + "/team/hello:1.0"
	pushLayout(t, layout, "hello", ref)

	ctx := context.Background()
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	r, _ := remote.ParseReference(ref)
	img, err := c.Resolve(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	artifacts := func(registry, repo string) []string {
		t.Helper()
		descs, err := c.Referrers(ctx, remote.Repository{Registry: registry, Name: repo}, img.Digest, "")
		if err != nil {
			t.Fatalf("referrers in %s/%s: %v", registry, repo, err)
		}
		var out []string
		for _, d := range descs {
			out = append(out, d.ArtifactType)
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	// The source: its expansion (published once the layers are expanded)
	// and a start-up profile (stored through the profile route, which
	// publishes it as an artifact too).
	var md api.MountDescriptor
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if slices.Contains(artifacts(src.Addr, "team/hello"), api.ArtifactTypeExpansion) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no expansion artifact in the source")
		}
	}
	l := img.Manifest.Layers[1]
	resp, err := http.Post("http://"+src.Addr+api.MountPath("team/hello", l.Digest), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&md)
	resp.Body.Close()
	pb, _ := json.Marshal(api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: l.Digest, Data: md.Data.Digest, Frames: []int{0}}}})
	req, _ := http.NewRequest("PUT", "http://"+src.Addr+api.ProfilePath("team/hello", img.Digest), bytes.NewReader(pb))
	req.Header.Set("Content-Type", "application/json")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT profile: %v %v", resp, err)
	}
	both := []string{api.ArtifactTypeExpansion, api.ArtifactTypeProfile}
	if got := artifacts(src.Addr, "team/hello"); !slices.Equal(got, both) {
		t.Fatalf("source artifacts %v, want %v", got, both)
	}

	copiers := map[string]func(from, to string){
		"skopeo copy --all": func(from, to string) {
			run(t, ctx, "skopeo", "copy", "-q", "--all", "--src-tls-verify=false", "--dest-tls-verify=false", "docker://"+from, "docker://"+to)
		},
		"crane copy": func(from, to string) { run(t, ctx, crane, "copy", "--insecure", from, to) },
		"oras cp -r": func(from, to string) {
			run(t, ctx, oras, "cp", "-r", "--from-plain-http", "--to-plain-http", from, to)
		},
	}
	for _, tc := range []struct {
		client, from, to string
		// want: the artifacts in the target right after the copy; later:
		// those the target has once it expanded the image itself.
		want, later []string
	}{
		{"skopeo copy --all", ref, dist + "/skopeo/hello:1.0", nil, nil},
		{"crane copy", ref, dist + "/crane/hello:1.0", nil, nil},
		{"oras cp -r", ref, dist + "/oras/hello:1.0", both, both},
		{"skopeo copy --all", ref, dst.Addr + "/skopeo/hello:1.0", nil, []string{api.ArtifactTypeExpansion}},
		{"oras cp -r", ref, dst.Addr + "/oras/hello:1.0", both, both},
		{"oras cp -r", dist + "/oras/hello:1.0", dst.Addr + "/fromdist/hello:1.0", both, both},
	} {
		name := tc.client + " " + strings.Split(tc.from, "/")[0] + " to " + strings.Split(tc.to, "/")[0]
		copiers[tc.client](tc.from, tc.to)
		to, _ := remote.ParseReference(tc.to)
		got := artifacts(to.Registry, to.Name)
		if !slices.Equal(got, tc.want) && !(len(got) == 0 && len(tc.want) == 0) {
			t.Errorf("%s: artifacts %v, want %v", name, got, tc.want)
		}
		if tc.later != nil && len(tc.later) != len(got) {
			for deadline := time.Now().Add(30 * time.Second); !slices.Equal(got, tc.later) && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				got = artifacts(to.Registry, to.Name)
			}
			if !slices.Equal(got, tc.later) {
				t.Errorf("%s: once expanded, artifacts %v, want %v", name, got, tc.later)
			}
		}
		// The expansion the target has is the same artifact as the source's.
		if slices.Contains(got, api.ArtifactTypeExpansion) {
			s, _ := c.Referrers(ctx, remote.Repository{Registry: src.Addr, Name: "team/hello"}, img.Digest, api.ArtifactTypeExpansion)
			d, _ := c.Referrers(ctx, remote.Repository{Registry: to.Registry, Name: to.Name}, img.Digest, api.ArtifactTypeExpansion)
			if len(s) != 1 || len(d) != 1 || s[0].Digest != d[0].Digest {
				t.Errorf("%s: expansion artifacts %v and %v differ", name, s, d)
			}
		}
		t.Logf("%s: %v", name, got)
	}
	// A strata registry given a profile artifact by a copy serves it.
	for _, repo := range []string{"oras/hello", "fromdist/hello"} {
		p, err := c.Profile(ctx, remote.Repository{Registry: dst.Addr, Name: repo}, img.Digest)
		if err != nil || len(p.Layers) != 1 || p.Pack != nil {
			t.Errorf("profile of the copy in %s: %+v, %v", repo, p, err)
		}
	}
}
