package integration

import (
	"fmt"
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
