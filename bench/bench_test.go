package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/strata-oci/strata/bench/link"
	"github.com/strata-oci/strata/bench/report"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestSmoke runs the harness end to end at its smallest (the tiny image,
// the unshaped profile, strata's lazy start once, the physical limit and
// one small read pass) so that it cannot rot, and checks that it leaves
// its outputs and nothing else behind. It asserts no timings.
func TestSmoke(t *testing.T) {
	testenv.RequireFUSE(t)
	cfg, _, err := parseFlags([]string{"-images", "tiny", "-profiles", "loopback", "-runs", "1",
		"-systems", "strata-lazy-cold,strata-lazy-profiled,strata-lazy-warm", "-read-runs", "1", "-read-files", "1", "-read-mib", "4", "-work", t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	testenv.RequireTool(t, append(cfg.Tools(), "busybox")...)
	cfg.Log = testWriter{t}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := run(ctx, cfg, out); err != nil {
		t.Fatal(err)
	}

	var rep report.Report
	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	for _, sys := range []string{report.StrataCold, report.StrataProfiled, report.StrataWarm} {
		st := rep.Find("tiny", "loopback", sys)
		if st == nil || st.Failures != 0 || st.FirstLine.N != 1 || st.FirstLine.Median <= 0 {
			t.Errorf("%s: %+v", sys, st)
		}
	}
	if l := rep.FindLimit("tiny", "loopback"); l == nil || l.ReadBytes == 0 || l.CompressedBytes == 0 {
		t.Errorf("physical limit: %+v", l)
	}
	if len(rep.Reads) != 6 {
		t.Errorf("%d read results, want 6 (2 patterns × 3 systems)", len(rep.Reads))
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## Start time: tiny", "strata-lazy-cold", "physical limit", "## Read throughput", "start-tiny-loopback.png"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q", want)
		}
	}
	for _, png := range []string{"start-tiny-loopback.png", "read-sequential.png", "read-random.png"} {
		if fi, err := os.Stat(filepath.Join(out, png)); err != nil || fi.Size() == 0 {
			t.Errorf("chart %s: %v", png, err)
		}
	}

	// Torn down: no namespace of this process, nothing mounted in its work
	// directory.
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), link.Prefix+itoa(os.Getpid())+"-") {
			t.Errorf("network namespace %s left behind", e.Name())
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), cfg.WorkParent) {
		t.Errorf("mounts left below %s", cfg.WorkParent)
	}
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestFlags checks the quick and default plans.
func TestFlags(t *testing.T) {
	cfg, _, err := parseFlags([]string{"-quick"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Runs != 3 || len(cfg.Profiles) != 2 || cfg.ReadRuns != 1 {
		t.Errorf("quick: %d runs, %d profiles, %d read runs", cfg.Runs, len(cfg.Profiles), cfg.ReadRuns)
	}
	cfg, _, err = parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Runs != 5 || len(cfg.Profiles) != 4 || len(cfg.Images) != 3 {
		t.Errorf("default: %d runs, %d profiles, %d images", cfg.Runs, len(cfg.Profiles), len(cfg.Images))
	}
	if _, _, err := parseFlags([]string{"-profiles", "moon"}); err == nil {
		t.Error("unknown profile accepted")
	}
}
