package integration

import (
	"archive/tar"
	"context"
	"fmt"
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

// TestCredentialHelper: strata pull, run and expand reach a registry that
// requires credentials with only a Docker credential helper configured
// (credHelpers in $DOCKER_CONFIG/config.json, the helper on PATH): the CLI
// and the node daemon it starts, which inherits its environment, run the
// helper. A configured helper that is missing is one clear sentence.
func TestCredentialHelper(t *testing.T) {
	testenv.RequireTool(t, "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600)
	reg := startRegistry(t, "--htpasswd", htpasswd)

	tr, _ := ocilayout.Tar([]ocilayout.Entry{{Name: "hello", Content: []byte("hi\n"), Type: tar.TypeReg}})
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "v1", ocilayout.Image{Layers: []ocilayout.Layer{ocilayout.GzipLayer(tr)}, Config: ocispec.ImageConfig{Cmd: []string{"/hello"}}}); err != nil {
		t.Fatal(err)
	}
	ref := reg.Addr + "/auth/img:v1"
	run(t, ctx, "skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds", "alice:s3cret", "oci:"+layout+":v1", "docker://"+ref)

	// docker-credential-test answers "get" from its creds file; every
	// question is logged to calls.
	bin := t.TempDir()
	helper := fmt.Sprintf(`#!/bin/sh
[ "$1" = get ] || { echo "unsupported action $1"; exit 1; }
read -r url
echo "$url" >> %[1]s/calls
while read -r u user secret; do
	if [ "$u" = "$url" ]; then
		printf '{"ServerURL":"%%s","Username":"%%s","Secret":"%%s"}\n' "$url" "$user" "$secret"
		exit 0
	fi
done < %[1]s/creds
echo "credentials not found in native keychain"
exit 1
`, bin)
	os.WriteFile(filepath.Join(bin, "docker-credential-test"), []byte(helper), 0o755)
	os.WriteFile(filepath.Join(bin, "creds"), []byte(reg.Addr+" alice s3cret\n"), 0o600)
	calls := func() []string {
		b, _ := os.ReadFile(filepath.Join(bin, "calls"))
		return strings.Fields(string(b))
	}
	dockerConfig := t.TempDir()
	setHelper := func(name string) {
		t.Helper()
		cfg := fmt.Sprintf(`{"credHelpers":{%q:%q}}`, reg.Addr, name)
		if err := os.WriteFile(filepath.Join(dockerConfig, "config.json"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The environment of every strata command below, and so of the daemon
	// the first one starts.
	t.Setenv("DOCKER_CONFIG", dockerConfig)
	t.Setenv("DOCKER_AUTH_CONFIG", "")
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	root := nodeRoot(t)

	// A helper that is not installed: the pull fails, in one sentence
	// naming it and the registry (the daemon's error, passed on by the CLI).
	setHelper("strata-missing")
	wantErr := "credential helper docker-credential-strata-missing for " + reg.Addr + ": not found on PATH"
	for _, args := range [][]string{
		{"pull", "--plain-http", ref},
		{"expand", "--plain-http", ref},
	} {
		var errOut string
		var failed bool
		if args[0] == "expand" { // no node, no --root
			_, e, code := strataNoRoot(t, args...)
			errOut, failed = e, code != 0
		} else {
			_, e, err := strataErr(root, args...)
			errOut, failed = e, err != nil
		}
		if !failed {
			t.Fatalf("strata %s with a missing credential helper succeeded", args[0])
		}
		t.Logf("strata %s: %s", args[0], strings.TrimSpace(errOut))
		if !strings.Contains(errOut, wantErr) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("strata %s: stderr %q, want one line with %q", args[0], errOut, wantErr)
		}
	}

	// The helper answering "credentials not found": anonymous, refused.
	setHelper("test")
	os.WriteFile(filepath.Join(bin, "creds"), nil, 0o600)
	_, errOut, err := strataErr(root, "pull", "--plain-http", ref)
	if err == nil || !strings.Contains(errOut, "401") {
		t.Fatalf("pull without credentials: %v, stderr %q; want a 401", err, errOut)
	}
	t.Logf("strata pull without credentials: %s", strings.TrimSpace(errOut))

	// The helper with the credentials: the daemon pulls, and strata
	// expand reads and pushes.
	os.WriteFile(filepath.Join(bin, "creds"), []byte(reg.Addr+" alice s3cret\n"), 0o600)
	before := len(calls())
	strata(t, root, "pull", "--plain-http", ref)
	if len(calls()) == before {
		t.Error("the node daemon pulled without asking the helper")
	}
	out := strata(t, root, "images")
	if !strings.Contains(out, ref) {
		t.Errorf("strata images does not list %s:\n%s", ref, out)
	}
	before = len(calls())
	out, errOut, code := strataNoRoot(t, "expand", "--plain-http", ref)
	if code != 0 {
		t.Fatalf("strata expand: exit %d: %s", code, errOut)
	}
	// strata's registry expanded the layer itself; expand reads and checks it.
	if !strings.Contains(out+errOut, "1 already expanded") || len(calls()) == before {
		t.Errorf("strata expand (helper asked %d times): %s", len(calls())-before, out)
	}
}
