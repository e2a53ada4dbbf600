package integration

import (
	"archive/tar"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/crypto/bcrypt"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestRegistryAuth: with --htpasswd, nobody pushes without credentials;
// with --anonymous-pull, anyone pulls.
func TestRegistryAuth(t *testing.T) {
	testenv.RequireTool(t, "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600)
	reg := startRegistry(t, "--htpasswd", htpasswd, "--anonymous-pull")

	tr, _ := ocilayout.Tar([]ocilayout.Entry{{Name: "hello", Content: []byte("hi\n"), Type: tar.TypeReg}})
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "v1", ocilayout.Image{Layers: []ocilayout.Layer{ocilayout.GzipLayer(tr)}, Config: ocispec.ImageConfig{Cmd: []string{"/hello"}}}); err != nil {
		t.Fatal(err)
	}
	dest := "docker://" + reg.Addr + "/auth/img:v1"
	if out, err := runErr(ctx, "skopeo", "copy", "--dest-tls-verify=false", "oci:"+layout+":v1", dest); err == nil {
		t.Fatalf("unauthenticated push succeeded:\n%s", out)
	}
	if out, err := runErr(ctx, "skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "alice:wrong", "oci:"+layout+":v1", dest); err == nil {
		t.Fatalf("push with a wrong password succeeded:\n%s", out)
	}
	if _, err := runErr(ctx, "skopeo", "inspect", "--tls-verify=false", dest); err == nil {
		t.Fatal("image exists after refused pushes")
	}
	run(t, ctx, "skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", "alice:s3cret", "oci:"+layout+":v1", dest)
	out := run(t, ctx, "skopeo", "inspect", "--tls-verify=false", "--raw", dest)
	if !strings.Contains(out, "layers") {
		t.Fatalf("anonymous pull: %s", out)
	}
	if out, err := runErr(ctx, "skopeo", "delete", "--tls-verify=false", dest); err == nil {
		t.Fatalf("anonymous delete succeeded:\n%s", out)
	}
	// Storing a start-up profile is a push: refused without credentials,
	// whatever the body (the check comes before the content is read).
	m := digest.FromString("any manifest")
	resp, err := http.DefaultClient.Do(mustRequest(t, http.MethodPut, "http://"+reg.Addr+api.ProfilePath("auth/img", m), `{"version":1}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("anonymous PUT of a start-up profile: %s, want 401", resp.Status)
	}
}

func mustRequest(t *testing.T, method, url, body string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return r
}
