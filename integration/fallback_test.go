package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/testimage"
)

// distributionVersion is the CNCF distribution registry used as a registry
// without layer mounts, built from the Go module proxy.
const distributionVersion = "github.com/distribution/distribution/v3/cmd/registry@v3.0.0"

// startDistribution runs the CNCF distribution registry on a free port.
func startDistribution(t *testing.T) string {
	t.Helper()
	addr, _ := startDistributionWith(t, "")
	return addr
}

// startDistributionWith runs the CNCF distribution registry on a free
// port with extra YAML appended to its configuration (an auth section);
// stop stops it early (it is stopped at the test's end anyway).
func startDistributionWith(t *testing.T, extra string) (addr string, stop func()) {
	t.Helper()
	bin := filepath.Join(testimage.DefaultCacheDir, "bin", "distribution-v3.0.0")
	if _, err := os.Stat(filepath.Join(bin, "registry")); err != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		os.MkdirAll(bin, 0o755)
		install := exec.CommandContext(ctx, "go", "install", distributionVersion)
		install.Env = append(os.Environ(), "GOBIN="+bin, "GOFLAGS=-mod=mod")
		install.Dir = bin
		if out, err := install.CombinedOutput(); err != nil {
			testenv.Unavailable(t, "cannot build the distribution registry: "+err.Error()+"\n"+tail(string(out), 2000))
		}
	}
	addr = freeAddr(t)
	dir := t.TempDir()
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr) + extra
	os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o644)
	cmd := exec.Command(filepath.Join(bin, "registry"), "serve", filepath.Join(dir, "config.yml"))
	logf, _ := os.Create(filepath.Join(dir, "log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() { once.Do(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() }) }
	t.Cleanup(stop)
	for i := 0; i < 100; i++ {
		if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
			c.Close()
			return addr, stop
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("distribution registry did not start")
	return "", nil
}

// TestRunFallback runs the Debian+python3 image from a registry without
// layer mounts: strata downloads and unpacks the layers and runs the same
// way, and says so.
func TestRunFallback(t *testing.T) {
	requireRun(t)
	layout, _, _ := debianPython(t)
	addr := startDistribution(t)
	ref := addr + "/debian/python:latest"
	pushLayout(t, layout, "latest", ref)
	root := nodeRoot(t)
	out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref, "python3", "-c", `print("hello")`)
	if code != 0 || out != "hello\n" {
		t.Fatalf("run: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "fallback") {
		t.Errorf("stderr does not say the fallback was used: %s", errOut)
	}
	if imgs := strata(t, root, "images"); !strings.Contains(imgs, "unpacked") {
		t.Errorf("images:\n%s", imgs)
	}
}
