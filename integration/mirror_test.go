package integration

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/strata-oci/strata/internal/testenv"
)

// TestMirror: strata's registry as a pull-through mirror of the CNCF
// distribution registry with htpasswd: a node that only knows the mirror
// runs an image of the upstream lazily (the mirror fetches, stores and
// expands it on the first request); with the upstream stopped, a fresh
// node still runs it from the mirror by tag.
func TestMirror(t *testing.T) {
	requireRun(t)
	testenv.RequireTool(t, "skopeo")
	dir := t.TempDir()
	hash, err := bcrypt.GenerateFromPassword([]byte("upstream-secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("puller:"+string(hash)+"\n"), 0o600)
	upstream, stopUpstream := startDistributionWith(t, fmt.Sprintf("auth:\n  htpasswd:\n    realm: test\n    path: %s\n", htpasswd))
	layout, _ := busyboxLayout(t)
	ctx := t.Context()
	run(t, ctx, "skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds", "puller:upstream-secret",
		"oci:"+layout+":hello", "docker://"+upstream+"/team/hello:1.0")

	pass := filepath.Join(dir, "password")
	os.WriteFile(pass, []byte("upstream-secret\n"), 0o600)
	mirror := startRegistry(t, "--upstream", "http://"+upstream, "--upstream-username", "puller",
		"--upstream-password-file", pass, "--upstream-ttl", "1s")
	ref := mirror.Addr + "/team/hello:1.0"

	root := nodeRoot(t)
	out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref)
	if code != 0 || out != "hello from a layer\n" {
		t.Fatalf("run through the mirror: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "lazy: layer mounts") {
		t.Errorf("the first start through the mirror was not lazy: %s", errOut)
	}
	fetched, total := dfTotals(t, root)
	t.Logf("first start: %s; fetched %d of %d bytes of expanded data", strings.TrimSpace(errOut), fetched, total)

	stopUpstream()
	time.Sleep(1100 * time.Millisecond) // past the tag's TTL: the mirror asks the upstream, which is down
	root2 := nodeRoot(t)
	out, errOut, code = strataCode(t, root2, "run", "--rm", "--plain-http", ref)
	if code != 0 || out != "hello from a layer\n" || !strings.Contains(errOut, "lazy: layer mounts") {
		t.Fatalf("run with the upstream down: code %d stdout %q stderr %s", code, out, errOut)
	}
}

// TestMirrorHostsDir: a node configured with containerd's hosts directory
// (hosts.toml naming strata's mirror) starts an image of the upstream
// lazily, reaching only the mirror: the upstream's name in the reference
// does not even resolve.
func TestMirrorHostsDir(t *testing.T) {
	requireRun(t)
	testenv.RequireTool(t, "skopeo")
	upstream, _ := startDistributionWith(t, "")
	layout, _ := busyboxLayout(t)
	run(t, t.Context(), "skopeo", "copy", "-q", "--dest-tls-verify=false",
		"oci:"+layout+":hello", "docker://"+upstream+"/team/hello:1.0")
	mirror := startRegistry(t, "--upstream", "http://"+upstream)

	hostsDir := t.TempDir()
	const name = "upstream.invalid" // never resolved: only the mirror is reached
	writeHostsTOML(t, hostsDir, name, fmt.Sprintf(`server = "https://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, name, mirror.Addr))
	root := nodeRoot(t)
	out, errOut, code := strataCode(t, root, "run", "--rm", "--hosts-dir", hostsDir, name+"/team/hello:1.0")
	if code != 0 || out != "hello from a layer\n" {
		t.Fatalf("run through hosts.toml's mirror: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "lazy: layer mounts") {
		t.Errorf("the start through hosts.toml's mirror was not lazy: %s", errOut)
	}
	t.Logf("through hosts.toml's mirror: %s", strings.TrimSpace(errOut))
}

// TestMirrorWithoutLayerMounts: hosts.toml names a mirror that has no layer
// mounts (the CNCF registry as a pull-through cache of a strata registry):
// the node reads manifests and blobs through the mirror, and asks the
// first host that offers layer mounts, strata's registry, for them: the
// start is lazy.
func TestMirrorWithoutLayerMounts(t *testing.T) {
	requireRun(t)
	origin := startRegistry(t)
	layout, _ := busyboxLayout(t)
	pushLayout(t, layout, "hello", origin.Addr+"/team/hello:1.0")
	cache, _ := startDistributionWith(t, fmt.Sprintf("proxy:\n  remoteurl: http://%s\n", origin.Addr))

	hostsDir := t.TempDir()
	writeHostsTOML(t, hostsDir, origin.Addr, fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, origin.Addr, cache))
	root := nodeRoot(t)
	out, errOut, code := strataCode(t, root, "run", "--rm", "--hosts-dir", hostsDir, origin.Addr+"/team/hello:1.0")
	if code != 0 || out != "hello from a layer\n" {
		t.Fatalf("run: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "lazy: layer mounts") {
		t.Errorf("not lazy with a mirror that has no layer mounts: %s", errOut)
	}
	// The pull went through the cache: it holds the repository now.
	resp, err := http.Get("http://" + cache + "/v2/_catalog")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), "team/hello") {
		t.Errorf("the node did not pull through the mirror: its catalog is %s", b)
	}
}

// writeHostsTOML writes containerd's hosts.toml for registry under dir.
func writeHostsTOML(t *testing.T, dir, registry, toml string) {
	t.Helper()
	d := filepath.Join(dir, registry)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}
