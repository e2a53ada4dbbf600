package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/strata-oci/strata/internal/testenv"
)

// TestSnapshotterPullSecret: a pod's image is in a registry that requires
// credentials, which the snapshotter does not have (an empty Docker
// config); pulled through the snapshotter's CRI image service proxy with
// credentials as the kubelet sends a pod's pull secret (crictl pull
// --creds), its layers are mounted lazily with them and the pod's
// container runs. Without credentials the pull fails, and nothing is
// mounted.
func TestSnapshotterPullSecret(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireTool(t, "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	layout, helloSize := busyboxLayout(t)
	pub := startRegistry(t)
	pause := pub.Addr + "/strata/pause:latest"
	pushLayout(t, layout, "pause", pause)
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600)
	priv := startRegistry(t, "--htpasswd", htpasswd)
	hello := priv.Addr + "/team/hello:latest"
	run(t, ctx, "skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds", "alice:s3cret",
		"oci:"+layout+":hello", "docker://"+hello)

	// The snapshotter's environment: no Docker credentials anywhere.
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	t.Setenv("DOCKER_AUTH_CONFIG", "")
	e := newCRIEnvWith(t, containerdVersions[0], pause, func(e *criEnv) {
		e.imageEndpoint = filepath.Join(e.dir, "cri-image.sock")
		e.snapArgs = []string{"--cri-image-service", e.imageEndpoint, "--cri-backend", e.sock}
	})
	e.plainHTTP(t, pub.Addr)
	e.plainHTTP(t, priv.Addr)
	e.crictl(t, "pull", pause)

	out, err := runErr(ctx, e.crictlBin, e.crictlArgs("pull", hello)...)
	if err == nil {
		t.Fatalf("pull without credentials succeeded:\n%s", out)
	}
	t.Logf("pull without credentials: %s", strings.TrimSpace(tail(out, 300)))

	before := blobBytesServed(t, priv)
	e.crictl(t, "pull", "--creds", "alice:s3cret", hello)
	pod, podCfg := e.runPod(t, "secret")
	if out := e.runContainer(t, pod, podCfg, hello, "hello"); out != "hello from a layer" {
		t.Fatalf("container output %q", out)
	}
	served := blobBytesServed(t, priv) - before
	log, _ := os.ReadFile(e.snapLog)
	mounted := 0
	for _, l := range strings.Split(string(log), "\n") {
		if strings.Contains(l, "layer mounted remotely") && strings.Contains(l, hello) {
			mounted++
		}
	}
	t.Logf("with the pull secret: %d layers of %s mounted remotely; the registry served %d blob bytes of an image of %d", mounted, hello, served, helloSize)
	if mounted == 0 {
		t.Errorf("no layer of %s was mounted remotely:\n%s", hello, grepLines(string(log), "layer"))
	}
	if served > helloSize/5 {
		t.Errorf("the registry served %d blob bytes, more than a fifth of the image's %d: not lazy", served, helloSize)
	}
	if strings.Contains(string(log), "s3cret") {
		t.Error("the snapshotter's log holds the password")
	}
	e.crictl(t, "stopp", pod)
	e.crictl(t, "rmp", pod)
}
