package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// TestRunConcurrentFreshNode starts 20 containers at once on a fresh node,
// several times: the first commands race to start the node daemon, and
// every run must start, print and exit 0 (once one run in 2 of 5 tries
// failed with "connection refused" or "node daemon exited at start").
func TestRunConcurrentFreshNode(t *testing.T) {
	requireRun(t)
	ref := busyboxImage(t, startRegistry(t))

	const tries, runs = 3, 20
	for try := range tries {
		root := nodeRoot(t)
		var wg sync.WaitGroup
		errs := make([]string, runs)
		for i := range runs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				want := fmt.Sprintf("run %d", i)
				out, errOut, err := strataErr(root, "run", "--rm", "--plain-http", ref, "/bin/sh", "-c", "echo "+want)
				if err != nil || strings.TrimSpace(out) != want {
					errs[i] = fmt.Sprintf("run %d: %v, stdout %q, stderr %s", i, err, out, errOut)
				}
			}()
		}
		wg.Wait()
		var failed []string
		for _, e := range errs {
			if e != "" {
				failed = append(failed, e)
			}
		}
		if len(failed) > 0 {
			log, _ := os.ReadFile(filepath.Join(root, "daemon.log"))
			t.Fatalf("try %d: %d of %d runs failed:\n%s\ndaemon log:\n%s", try, len(failed), runs, strings.Join(failed, "\n"), tail(string(log), 30))
		}
	}
}
