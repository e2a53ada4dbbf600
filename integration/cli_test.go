package integration

import (
	"archive/tar"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
)

// strataNoRoot runs strata with args as given and returns stdout, stderr
// and the exit status.
func strataNoRoot(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(strataBin, args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return stdout.String(), stderr.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("strata %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), 0
}

// TestUsageErrors: a command line strata cannot act on fails with exit
// status 2 (125 for run, as docker run) and one line on stderr naming what
// was wrong, instead of printing help and succeeding.
func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want []string // in the one line of stderr
	}{
		// gc on a directory that is not a registry's root creates nothing
		// and says so.
		{[]string{"registry", "gc", "--root", "/nonexistent-strata-root"}, 1, []string{"/nonexistent-strata-root is not a registry root"}},
		{[]string{"registry", "bogus"}, 2, []string{`unknown command "bogus"`, "serve"}},
		{[]string{"bogus"}, 2, []string{`strata: unknown command "bogus"`, "run", "registry"}},
		{[]string{"help", "registry", "bogus"}, 2, []string{`unknown command "bogus"`}},
		{[]string{"completion", "bogus"}, 2, []string{`unknown command "bogus"`, "bash"}},
		{[]string{"pull"}, 2, []string{"strata pull:", "strata pull --help"}},
		{[]string{"ps", "--bogus"}, 2, []string{"strata ps: unknown flag: --bogus"}},
		{[]string{"registry", "serve", "--cache-size", "1GiB"}, 2, []string{"unknown flag: --cache-size"}},
		{[]string{"--cache-size", "1GiB", "registry", "serve"}, 2, []string{"unknown flag: --cache-size"}},
		{[]string{"run"}, 125, []string{"strata run:"}},
		{[]string{"run", "--bogus", "x"}, 125, []string{"strata run: unknown flag: --bogus"}},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			stdout, stderr, code := strataNoRoot(t, tc.args...)
			if code != tc.code {
				t.Errorf("exit status %d, want %d", code, tc.code)
			}
			if stdout != "" {
				t.Errorf("stdout is not empty:\n%s", stdout)
			}
			if n := strings.Count(stderr, "\n"); n != 1 {
				t.Errorf("stderr has %d lines, want 1:\n%s", n, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr does not say %q:\n%s", w, stderr)
				}
			}
		})
	}
	// A group on its own is a request for its help.
	if stdout, _, code := strataNoRoot(t, "registry"); code != 0 || !strings.Contains(stdout, "serve") {
		t.Errorf("strata registry: exit status %d, stdout:\n%s", code, stdout)
	}
}

// TestFlagSplit: the registry's commands neither list nor take the node's
// flags, and registry serve's --root is its own; node commands take the
// node's flags before or after their name.
func TestFlagSplit(t *testing.T) {
	help, _, code := strataNoRoot(t, "registry", "serve", "--help")
	if code != 0 {
		t.Fatalf("registry serve --help: exit status %d", code)
	}
	for _, node := range []string{"--cache-size", "--fetch-timeout", "--startup-profiles", "node state directory"} {
		if strings.Contains(help, node) {
			t.Errorf("registry serve --help lists the node's %s:\n%s", node, help)
		}
	}
	for _, own := range []string{"--root", "registry storage directory", "--addr", "--log-level"} {
		if !strings.Contains(help, own) {
			t.Errorf("registry serve --help does not list %s:\n%s", own, help)
		}
	}
	help, _, _ = strataNoRoot(t, "run", "--help")
	for _, node := range []string{"--root", "--cache-size", "--fetch-timeout", "--startup-profiles"} {
		if !strings.Contains(help, node) {
			t.Errorf("run --help does not list %s:\n%s", node, help)
		}
	}
	// Both spellings reach the node's flags (ps needs no daemon).
	root := t.TempDir()
	for _, args := range [][]string{
		{"--root", root, "--cache-size", "16MiB", "--fetch-timeout", "3s", "--startup-profiles", "off", "ps", "-a"},
		{"ps", "--root", root, "--cache-size", "16MiB", "-a"},
	} {
		if out, errOut, code := strataNoRoot(t, args...); code != 0 || !strings.Contains(out, "CONTAINER ID") {
			t.Errorf("strata %v: exit status %d\nstdout: %s\nstderr: %s", args, code, out, errOut)
		}
	}
}

// busyboxImage pushes a busybox image with a file that is not executable,
// /etc/noexec, and returns its reference.
func busyboxImage(t *testing.T, reg *registryProc) string {
	t.Helper()
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		testenv.Unavailable(t, "busybox-static is not installed")
	}
	tr, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Content: busybox, Mode: 0o755},
		{Name: "bin/sh", Type: tar.TypeSymlink, Linkname: "busybox"},
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "etc/noexec", Content: []byte("echo not executable\n"), Mode: 0o644},
	})
	if err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(t.TempDir(), "oci")
	if _, err := ocilayout.Write(layout, "latest", ocilayout.Image{
		Layers: []ocilayout.Layer{ocilayout.GzipLayer(tr)},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh"}, Env: []string{"PATH=/bin"}},
	}); err != nil {
		t.Fatal(err)
	}
	ref := reg.Addr + "/exit/busybox:latest"
	pushLayout(t, layout, "latest", ref)
	return ref
}

// TestRunExitStatus: strata run exits as docker run does — 125 when strata
// fails, 126 when the command cannot be executed, 127 when it is not
// found, else the command's own status — and says why in one sentence, not
// in runc's log lines.
func TestRunExitStatus(t *testing.T) {
	requireRun(t)
	reg := startRegistry(t)
	ref := busyboxImage(t, reg)
	root := nodeRoot(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string // on stderr
	}{
		{"exit 3", []string{"--rm", "--plain-http", ref, "sh", "-c", "exit 3"}, 3, ""},
		{"not found", []string{"--rm", "--plain-http", ref, "nosuchcmd"}, 127, `strata: exec "nosuchcmd": executable file not found in $PATH`},
		{"no such file", []string{"--rm", "--plain-http", ref, "/bin/nosuchcmd"}, 127, `strata: exec "/bin/nosuchcmd": stat /bin/nosuchcmd: no such file or directory`},
		{"not executable", []string{"--rm", "--plain-http", ref, "/etc/noexec"}, 126, `strata: exec "/etc/noexec": permission denied`},
		{"detached not found", []string{"-d", "--plain-http", ref, "nosuchcmd"}, 127, `strata: exec "nosuchcmd": executable file not found in $PATH`},
		{"no such image", []string{"--rm", "--plain-http", reg.Addr + "/no/such:image", "true"}, 125, "strata: "},
		{"registry unreachable", []string{"--rm", "--plain-http", freeAddr(t) + "/no/registry:here", "true"}, 125, "strata: "},
		{"bad flag", []string{"--bogus", ref}, 125, "strata run: unknown flag: --bogus"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := strataCode(t, root, append([]string{"run"}, tc.args...)...)
			if code != tc.code {
				t.Errorf("exit status %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			if !strings.Contains(errOut, tc.want) {
				t.Errorf("stderr does not say %q:\n%s", tc.want, errOut)
			}
			for _, raw := range []string{"runc run failed", "level=error", `"level"`} {
				if strings.Contains(errOut, raw) {
					t.Errorf("stderr shows runc's own line (%q):\n%s", raw, errOut)
				}
			}
			if tc.code >= 125 {
				// Lines other than the ready report: one message, its
				// context said once.
				var msgs []string
				for _, l := range strings.Split(strings.TrimSpace(errOut), "\n") {
					if !strings.Contains(l, ") ready in ") {
						msgs = append(msgs, l)
					}
				}
				if len(msgs) != 1 {
					t.Errorf("want one message on stderr, got %d:\n%s", len(msgs), errOut)
				} else if repeated(msgs[0]) != "" {
					t.Errorf("the message repeats %q: %s", repeated(msgs[0]), msgs[0])
				}
			}
		})
	}
	if ps := strata(t, root, "ps", "-a"); strings.Count(ps, "\n") != 1 {
		t.Errorf("containers that never started are left behind:\n%s", ps)
	}
}

// repeated returns a context prefix ("word ARG: ") that msg says twice, or "".
func repeated(msg string) string {
	parts := strings.Split(msg, ": ")
	seen := map[string]bool{}
	for _, p := range parts[:len(parts)-1] {
		if seen[p] {
			return p
		}
		seen[p] = true
	}
	return ""
}
