package registry_test

import (
	"archive/tar"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestTokenSkopeo: a client of another project (skopeo, containers/image)
// pushes, pulls and copies between repositories through a token server,
// which grants ci pull and push on team/*, pull on library/*, and nothing
// on secret/*. The copy from library/ is a cross-repository mount; the one
// from secret/ (read with the admin's password, so that skopeo knows where
// the blob is) may not mount and uploads instead.
func TestTokenSkopeo(t *testing.T) {
	testenv.RequireTool(t, "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	kit := newTokenKit(t)
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		if !ok || pass != user+"-pw" || r.URL.Query().Get("service") != "strata" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		access := []accessEntry{}
		for _, sc := range r.URL.Query()["scope"] {
			for _, s := range strings.Fields(sc) {
				p := strings.Split(s, ":")
				if len(p) != 3 || p[0] != "repository" {
					continue
				}
				var granted []string
				for _, a := range strings.Split(p[2], ",") {
					switch {
					case user == "admin",
						strings.HasPrefix(p[1], "team/") && (a == "pull" || a == "push"),
						strings.HasPrefix(p[1], "library/") && a == "pull":
						granted = append(granted, a)
					}
				}
				access = append(access, accessEntry{"repository", p[1], granted})
			}
		}
		json.NewEncoder(w).Encode(map[string]any{"token": kit.sign(t, kit.key, "issuer", "strata", time.Now().Add(time.Hour), access...), "expires_in": 3600})
	}))
	defer tokens.Close()
	ta, err := registry.NewTokenAuth(tokens.URL+"/token", "issuer", "strata", kit.cert)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	h := registry.Handler(registry.New(st, registry.Options{}), registry.ServeConfig{Store: st, Token: ta})
	var mu sync.Mutex
	mounts := map[string]int{} // from → status of the mount request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusRecorder{ResponseWriter: w}
		h.ServeHTTP(sw, r)
		if from := r.URL.Query().Get("from"); r.Method == "POST" && from != "" && sw.code != http.StatusUnauthorized {
			mu.Lock()
			mounts[from] = sw.code
			mu.Unlock()
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	// Two images of a layer each: what is in secret/ is nowhere else.
	layout := filepath.Join(t.TempDir(), "oci")
	for _, tag := range []string{"library", "secret"} {
		tr, _ := ocilayout.Tar([]ocilayout.Entry{{Name: "hello", Content: []byte(tag + "\n"), Type: tar.TypeReg}})
		if _, err := ocilayout.Write(layout, tag, ocilayout.Image{Layers: []ocilayout.Layer{ocilayout.GzipLayer(tr)}, Config: ocispec.ImageConfig{Cmd: []string{"/hello"}}}); err != nil {
			t.Fatal(err)
		}
	}
	home := t.TempDir() // skopeo's blob-info cache, kept out of the user's
	skopeo := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "skopeo", append([]string{"--insecure-policy"}, args...)...)
		cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+home, "XDG_CONFIG_HOME="+home, "XDG_RUNTIME_DIR="+home)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	must := func(args ...string) {
		t.Helper()
		if out, err := skopeo(args...); err != nil {
			t.Fatalf("skopeo %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ref := func(repo string) string { return "docker://" + host + "/" + repo + ":v1" }
	// The admin stores the image in library/ and secret/.
	for _, tag := range []string{"library", "secret"} {
		must("copy", "--dest-tls-verify=false", "--dest-creds", "admin:admin-pw", "oci:"+layout+":"+tag, ref(tag+"/base"))
	}
	// ci pulls from library/ and team/, not from secret/.
	must("inspect", "--tls-verify=false", "--creds", "ci:ci-pw", "--raw", ref("library/base"))
	if out, err := skopeo("inspect", "--tls-verify=false", "--creds", "ci:ci-pw", "--raw", ref("secret/base")); err == nil {
		t.Errorf("ci read secret/base:\n%s", out)
	}
	// ci may not push to library/.
	if out, err := skopeo("copy", "--dest-tls-verify=false", "--dest-creds", "ci:ci-pw", "oci:"+layout+":library", ref("library/other")); err == nil {
		t.Errorf("ci pushed to library/other:\n%s", out)
	}
	// Copies into team/: from library/ by a mount, from secret/ (read with
	// the admin's password) by an upload.
	must("copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", "ci:ci-pw", "--dest-creds", "ci:ci-pw", ref("library/base"), ref("team/a"))
	must("copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", "admin:admin-pw", "--dest-creds", "ci:ci-pw", ref("secret/base"), ref("team/b"))
	must("inspect", "--tls-verify=false", "--creds", "ci:ci-pw", "--raw", ref("team/b"))
	mu.Lock()
	defer mu.Unlock()
	if code := mounts["library/base"]; code != http.StatusCreated {
		t.Errorf("mount from library/base: %d, want 201", code)
	}
	// (skopeo checks the source with a HEAD first, refused, and does not
	// ask; TestTokenMount covers the mount asked.)
	if code, ok := mounts["secret/base"]; ok && code != http.StatusAccepted {
		t.Errorf("mount from secret/base: %d, want an upload session (202)", code)
	}
	t.Logf("cross-repository mounts skopeo asked for: %v", mounts)
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.code == 0 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}
