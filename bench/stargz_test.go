package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-oci/strata/bench/report"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestSmokeStargz runs the peer system, stargz-snapshotter, at its
// smallest: the tiny image converted to eStargz plain and optimized (the
// files the workload reads measured without a physical-limit run), each
// started once under a fresh containerd on the unshaped profile. It builds
// the peer binary (bench/stargz), which takes a minute on a cold build
// cache. It asserts no timings.
func TestSmokeStargz(t *testing.T) {
	testenv.RequireFUSE(t)
	cfg, _, err := parseFlags([]string{"-images", "tiny", "-profiles", "loopback", "-runs", "1",
		"-systems", "stargz,stargz-optimized", "-no-limit", "-read-runs", "0", "-work", t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	testenv.RequireTool(t, append(cfg.Tools(), "busybox")...)
	cfg.Log = testWriter{t}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if err := run(ctx, cfg, out); err != nil {
		t.Fatal(err)
	}
	rep, err := report.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, sys := range []string{report.Stargz, report.StargzOptimized} {
		st := rep.Find("tiny", "loopback", sys)
		if st == nil || st.Failures != 0 || st.FirstLine.N != 1 || st.FirstLine.Median <= 0 || st.LinkBytes.Median <= 0 {
			t.Errorf("%s: %+v", sys, st)
		}
	}
	if im := rep.Images[0]; im.EStargzBytes == 0 || im.EStargzOptimizedBytes == 0 || im.PrioritizedFiles == 0 {
		t.Errorf("eStargz conversions: %+v", im)
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| loopback (unshaped) | stargz-optimized |", "## strata and stargz-snapshotter"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q", want)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), cfg.WorkParent) {
		t.Errorf("mounts left below %s", cfg.WorkParent)
	}
}
