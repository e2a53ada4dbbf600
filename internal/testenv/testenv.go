// Package testenv decides whether a test that needs privileges or host tools
// can run here. Such tests skip with a reason on a machine that lacks what
// they need, and fail instead when STRATA_TEST_PRIVILEGED=1 (CI sets it), so
// a green CI never hides a skipped privileged test.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// Strict reports whether privileged tests must run (STRATA_TEST_PRIVILEGED=1).
func Strict() bool { return os.Getenv("STRATA_TEST_PRIVILEGED") == "1" }

// Unavailable skips the test with reason, or fails it in strict mode.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if Strict() {
		t.Fatalf("STRATA_TEST_PRIVILEGED=1 but %s", reason)
	}
	t.Skip("skipping: " + reason)
}

// RequireRoot requires uid 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "test needs root")
	}
}

// RequireFUSE requires root and a usable /dev/fuse.
func RequireFUSE(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		Unavailable(t, "test needs /dev/fuse: "+err.Error())
		return
	}
	f.Close()
}

// RequireTool requires each named program on PATH.
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Unavailable(t, "test needs "+n+" on PATH")
		}
	}
}
