package report_test

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/bench/report"
)

func TestOf(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want report.Stat
	}{
		{nil, report.Stat{}},
		{[]float64{3}, report.Stat{Median: 3, Min: 3, Max: 3, N: 1}},
		{[]float64{5, 1, 3}, report.Stat{Median: 3, Min: 1, Max: 5, N: 3}},
		{[]float64{4, 1, 2, 3}, report.Stat{Median: 2.5, Min: 1, Max: 4, N: 4}},
	} {
		if diff := cmp.Diff(tc.want, report.Of(tc.in)); diff != "" {
			t.Errorf("Of(%v): %s", tc.in, diff)
		}
	}
}

// TestMarkdown renders a small report: ratios are taken against the
// baseline of the same image and profile, failed runs are left out of the
// statistics and counted.
func TestMarkdown(t *testing.T) {
	r := &report.Report{
		Runs:     2,
		Images:   []report.Image{{Name: "img", Layers: 1, CompressedBytes: 100e6, Workload: []string{"echo", "hi there"}}},
		Profiles: []report.Profile{{Name: "p", Label: "p (test)"}},
		Limits:   []report.Limit{{Image: "img", Profile: "p", Seconds: 0.5, LocalSeconds: 0.1}},
	}
	add := func(sys string, samples ...report.Sample) {
		st := report.Start{Image: "img", Profile: "p", System: sys, Samples: samples}
		st.Summarise(100e6)
		r.Start = append(r.Start, st)
	}
	add(report.Containerd, report.Sample{FirstLine: 10 * time.Second, LinkBytes: 100e6}, report.Sample{FirstLine: 12 * time.Second, LinkBytes: 100e6})
	add(report.StrataCold, report.Sample{FirstLine: time.Second, Ready: 300 * time.Millisecond, LinkBytes: 10e6, Requests: 20, Conns: 1}, report.Sample{Error: "boom"})
	add(report.StrataWarm, report.Sample{FirstLine: 200 * time.Millisecond})
	add(report.StrataProfiled, report.Sample{FirstLine: 500 * time.Millisecond, LinkBytes: 4e6})
	add(report.StargzOptimized, report.Sample{FirstLine: 2 * time.Second, LinkBytes: 5e6})
	r.Images[0].EStargzOptimizedBytes, r.Images[0].PrioritizedFiles = 101e6, 7
	md := r.Markdown(nil)
	for _, want := range []string{
		"| p (test) | containerd | **11.00 s** | 10.00 s–12.00 s |  | 1.0x | 22.0 | 100 MB | 100.0% | (0) |",
		"| p (test) | strata-lazy-cold | **1.00 s** | 1.00 s–1.00 s | 300 ms | 11.0x | 2.0 | 10 MB | 10.0% | 20 (1) |",
		"| 2 (1) |",
		"2.0 of local start",
		"`echo 'hi there'`",
		"| p (test) | stargz-optimized | **2.00 s** |",
		"| img | 100 MB |  | 101 MB | 7 |",
		"| img | p (test) |  | 2.00 s (5.0 MB) | 1.00 s (10 MB) | 500 ms (4.0 MB) |  | 4.0x faster |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}
