package integration

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestConfigRegistry: strata registry serve takes its flags from
// --config's [registry], a flag on the command line winning.
func TestConfigRegistry(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "registry.toml")
	addr := freeAddr(t)
	os.WriteFile(file, []byte(fmt.Sprintf("[registry]\naddr = %q\nroot = %q\nexpand-workers = 1\nlog-level = \"debug\"\n", addr, filepath.Join(dir, "registry"))), 0o644)
	for _, tc := range []struct {
		name  string
		extra []string
	}{{"file", nil}, {"flag wins", []string{"--addr", freeAddr(t)}}} {
		t.Run(tc.name, func(t *testing.T) {
			want := addr
			if tc.extra != nil {
				want = tc.extra[1]
			}
			cmd := exec.Command(strataBin, append([]string{"registry", "serve", "--config", file}, tc.extra...)...)
			var out lockedBuffer // written by the process while the test reads it
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				cmd.Process.Signal(os.Interrupt)
				cmd.Wait()
				if t.Failed() {
					t.Logf("registry output:\n%s", tail(out.String(), 4000))
				}
			}()
			for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				resp, err := http.Get("http://" + want + "/v2/")
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						t.Fatalf("GET /v2/: %s", resp.Status)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("registry does not answer on %s", want)
				}
			}
			// The request is logged once its answer is sent: wait a little.
			for deadline := time.Now().Add(5 * time.Second); !strings.Contains(out.String(), "level=DEBUG"); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Error("log-level = \"debug\" from the file: no debug lines")
					break
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "registry")); err != nil {
				t.Errorf("root from the file: %v", err)
			}
		})
	}
}

// TestConfigNode: a CLI command given --config finds the node's root in
// [node] and starts the daemon with the file, which takes its own keys
// from it (idle-timeout: it exits within seconds, not the default 30s).
func TestConfigNode(t *testing.T) {
	dir := t.TempDir()
	root := nodeRoot(t)
	file := filepath.Join(dir, "node.toml")
	os.WriteFile(file, []byte(fmt.Sprintf("[node]\nroot = %q\ncache-size = \"64MiB\"\nidle-timeout = \"1s\"\n", root)), 0o644)
	cmd := exec.Command(strataBin, "images", "--config", "node.toml")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("strata images --config node.toml: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(root, "daemon.pid"))
	if err != nil {
		t.Fatalf("no daemon under the file's root: %v", err)
	}
	pid := strings.TrimSpace(string(b))
	args, _ := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
	if !strings.Contains(string(args), "\x00--config\x00"+file+"\x00") {
		t.Errorf("daemon started as %q, without --config %s", strings.ReplaceAll(string(args), "\x00", " "), file)
	}
	start := time.Now()
	for { // Serve removes daemon.pid as it returns
		if _, err := os.Stat(filepath.Join(root, "daemon.pid")); err != nil {
			break
		}
		if time.Since(start) > 15*time.Second {
			t.Fatalf("daemon %s still running after %s: idle-timeout from the file not taken", pid, time.Since(start))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// lockedBuffer is a strings.Builder safe for a process's writes while a
// test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRegistryRootLock: a second registry on a root another serves exits
// with one line naming the root and the process, and leaves it alone.
func TestRegistryRootLock(t *testing.T) {
	reg := startRegistry(t)
	root := reg.Root
	cmd := exec.Command(strataBin, "registry", "serve", "--addr", freeAddr(t), "--root", root)
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("a second registry on %s started:\n%s", root, out)
	}
	if !strings.Contains(string(out), "registry root in use") || !strings.Contains(string(out), root) {
		t.Errorf("second registry: %v: %s", err, out)
	}
	if resp, err := http.Get("http://" + reg.Addr + "/v2/"); err != nil || resp.StatusCode != 200 {
		t.Errorf("the first registry stopped answering: %v", err)
	}
}
