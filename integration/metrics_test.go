package integration

import (
	"bufio"
	"net/http"
	"strconv"
	"strings"
	"testing"
)

// TestRunMetrics: `strata --metrics-addr … run` starts a daemon that
// serves the node's metrics, and a lazy start shows in them.
func TestRunMetrics(t *testing.T) {
	requireRun(t)
	reg := startRegistry(t)
	ref := busyboxImage(t, reg)
	root := nodeRoot(t)
	addr := freeAddr(t)
	out := strata(t, root, "--metrics-addr", addr, "run", "--rm", "--plain-http", ref, "sh", "-c", "cat /bin/busybox | wc -c")
	if strings.TrimSpace(out) == "" {
		t.Fatalf("run printed nothing")
	}

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	s := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if line := sc.Text(); line != "" && !strings.HasPrefix(line, "#") {
			i := strings.LastIndexByte(line, ' ')
			s[line[:i]], _ = strconv.ParseFloat(line[i+1:], 64)
		}
	}
	for name, min := range map[string]float64{
		`strata_node_fetched_bytes_total{via="frames"}`: 1, // busybox, lazily
		`strata_node_read_miss_seconds_count`:           1,
		`strata_node_frame_requests_total`:              1,
		`strata_node_layers_mounted{mode="lazy"}`:       1, // lingering
		`strata_node_cache_bytes{kind="frame"}`:         1,
	} {
		if s[name] < min {
			t.Errorf("%s = %v, want at least %v", name, s[name], min)
		}
	}
	if n := s[`strata_node_leases{kind="container"}`]; n != 0 {
		t.Errorf("%v container leases after run --rm", n)
	}
}
