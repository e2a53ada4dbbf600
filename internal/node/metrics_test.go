package node_test

import (
	"bufio"
	"context"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/node"
)

// scrape reads m's metrics handler: each sample by its name and labels as
// the text format writes them (strata_node_leases{kind="container"}).
func scrape(t *testing.T, m *node.Manager) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	m.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("metrics: %d %s", rec.Code, rec.Body)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// waitMetric scrapes m until ok holds for sample name, and returns the
// samples.
func waitMetric(t *testing.T, m *node.Manager, name string, ok func(float64) bool) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := scrape(t, m)
		if v, found := s[name]; found && ok(v) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is %v", name, s[name])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMetrics(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	pushImage(t, "http://"+host, "app", "v1", 2)
	f := newFakeMounter()
	m := openNode(t, t.TempDir(), f, node.Options{CacheSize: 64 << 20, CompleteMax: 1 << 20})
	defer m.Close(ctx)

	s := scrape(t, m)
	for _, name := range []string{
		`strata_node_fetched_bytes_total{via="frames"}`, `strata_node_fetched_bytes_total{via="pack"}`,
		`strata_node_fetched_bytes_total{via="completion"}`, `strata_node_fetched_bytes_total{via="layer"}`,
		`strata_node_frame_requests_total`, `strata_node_frame_request_errors_total`, `strata_node_corrupt_frames_total`,
		`strata_node_frames_total{from="registry"}`, `strata_node_frames_total{from="cache"}`, `strata_node_frames_total{from="memory"}`,
		`strata_node_opens_total{how="passthrough"}`, `strata_node_opens_total{how="served"}`,
		`strata_node_served_reads_total`, `strata_node_served_read_bytes_total`,
		`strata_node_read_miss_seconds_count`, `strata_node_read_miss_seconds_sum`, `strata_node_read_miss_seconds_bucket{le="+Inf"}`,
		`strata_node_cache_bytes{kind="frame"}`, `strata_node_cache_bytes{kind="file"}`, `strata_node_cache_items{kind="frame"}`,
		`strata_node_cache_limit_bytes`, `strata_node_cache_hits_total`, `strata_node_cache_misses_total`,
		`strata_node_cache_evictions_total`, `strata_node_cache_corrupt_total`,
		`strata_node_completion_files_total`, `strata_node_completion_bytes_total`, `strata_node_completion_failures_total`, `strata_node_completion_pending`,
		`strata_node_layers_mounted{mode="lazy"}`, `strata_node_layers_mounted{mode="unpacked"}`, `strata_node_layers_lingering`,
		`strata_node_union_mounts`, `strata_node_leases{kind="container"}`, `strata_node_leases{kind="mount"}`,
		`strata_node_fallbacks_total{reason="no_expansion_referrer"}`, `strata_node_fallbacks_total{reason="expansion_refused"}`,
		`go_goroutines`, `process_open_fds`,
	} {
		if _, ok := s[name]; !ok {
			t.Errorf("no %s", name)
		}
	}
	if s[`strata_node_cache_limit_bytes`] != 64<<20 || s[`strata_node_layers_mounted{mode="lazy"}`] != 0 {
		t.Errorf("before anything: cache limit %v, %v lazy layers mounted", s[`strata_node_cache_limit_bytes`], s[`strata_node_layers_mounted{mode="lazy"}`])
	}

	// Mounted: a container and a union mount of a lazy image share its two layers.
	ref := host + "/app:v1"
	a, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:a", Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	union := filepath.Join(t.TempDir(), "u")
	if _, err := m.Acquire(ctx, node.AcquireRequest{ID: "mount:" + union, Ref: ref, Union: union}); err != nil {
		t.Fatal(err)
	}
	s = scrape(t, m)
	for name, want := range map[string]float64{
		`strata_node_layers_mounted{mode="lazy"}`: 2, `strata_node_leases{kind="container"}`: 1,
		`strata_node_leases{kind="mount"}`: 1, `strata_node_union_mounts`: 1, `strata_node_layers_lingering`: 0,
	} {
		if s[name] != want {
			t.Errorf("mounted: %s = %v, want %v", name, s[name], want)
		}
	}

	// Frames fetched by a layer (a prefetch: reads need FUSE) are counted,
	// then cached.
	f.mu.Lock()
	fs := f.layers[a.Lowers[0]].fs
	f.mu.Unlock()
	fs.Prefetch([]int{0})
	s = waitMetric(t, m, `strata_node_cache_items{kind="frame"}`, func(v float64) bool { return v >= 1 })
	fetched := s[`strata_node_fetched_bytes_total{via="frames"}`]
	if fetched <= 0 || s[`strata_node_frame_requests_total`] < 1 || s[`strata_node_frames_total{from="registry"}`] < 1 || s[`strata_node_cache_bytes{kind="frame"}`] <= 0 {
		t.Errorf("after a prefetch: fetched %v bytes, %v requests, %v frames, cache %v bytes", fetched,
			s[`strata_node_frame_requests_total`], s[`strata_node_frames_total{from="registry"}`], s[`strata_node_cache_bytes{kind="frame"}`])
	}

	// Unmounted: the gauges fall, the counters keep what the layers did.
	for _, id := range []string{"container:a", "mount:" + union} {
		if err := m.Release(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	f.waitLayers(t, 0)
	s = scrape(t, m)
	if s[`strata_node_layers_mounted{mode="lazy"}`] != 0 || s[`strata_node_leases{kind="container"}`] != 0 || s[`strata_node_union_mounts`] != 0 {
		t.Errorf("released: %v lazy layers, %v container leases, %v unions", s[`strata_node_layers_mounted{mode="lazy"}`],
			s[`strata_node_leases{kind="container"}`], s[`strata_node_union_mounts`])
	}
	if got := s[`strata_node_fetched_bytes_total{via="frames"}`]; got < fetched {
		t.Errorf("bytes fetched fell from %v to %v as the layers were unmounted", fetched, got)
	}

	// A registry without layer mounts nor an expansion referrer: a fallback.
	_, plain := testRegistry(t, false)
	layers := pushImage(t, "http://"+plain, "app", "v2", 2)
	if _, err := m.Pull(ctx, plain+"/app:v2"); err != nil {
		t.Fatal(err)
	}
	s = scrape(t, m)
	if n := s[`strata_node_fallbacks_total{reason="no_expansion_referrer"}`]; n != 1 {
		t.Errorf("fallbacks for no expansion referrer: %v, want 1", n)
	}
	if got, want := s[`strata_node_fetched_bytes_total{via="layer"}`], float64(layers[0].Size+layers[1].Size); got != want {
		t.Errorf("fallback downloads: %v bytes, want %v", got, want)
	}
}
