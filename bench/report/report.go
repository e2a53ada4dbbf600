// Package report holds the benchmark's results: the samples of every run,
// their medians with min and max, ratios against the baselines measured in
// the same run, and their renderings as JSON, a markdown table and charts.
package report

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Report is one run of the harness.
type Report struct {
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration_ns"`
	Command  string        `json:"command"`
	Host     Host          `json:"host"`
	Runs     int           `json:"runs"`
	MinRuns  int           `json:"min_runs"`
	Budget   time.Duration `json:"budget_ns"`
	Images   []Image       `json:"images"`
	Profiles []Profile     `json:"profiles"`
	Start    []Start       `json:"start"`
	Limits   []Limit       `json:"limits,omitempty"`
	Reads    []Read        `json:"reads,omitempty"`
	// Trees are tree walks (tar of an image's /usr), cold and warm.
	Trees []Read `json:"trees,omitempty"`
	// ReadLink is the link profile of the reads and tree walks.
	ReadLink string   `json:"readLink,omitempty"`
	Notes    []string `json:"notes,omitempty"`
}

// Host describes the machine.
type Host struct {
	Kernel string `json:"kernel"`
	CPUs   int    `json:"cpus"`
	Commit string `json:"commit,omitempty"`
}

// Image is one benchmark image.
type Image struct {
	Name            string   `json:"name"`
	Description     string   `json:"description"`
	Layers          int      `json:"layers"`
	CompressedBytes int64    `json:"compressed_bytes"`
	UnpackedBytes   int64    `json:"unpacked_bytes"`
	Workload        []string `json:"workload"`
	WorkloadLabel   string   `json:"workload_label,omitempty"`
	// ExpandedIndexBytes and ExpandedDataBytes are the sizes of the
	// expansions strata's registry made of the layers (all layers).
	ExpandedIndexBytes int64 `json:"expanded_index_bytes"`
	ExpandedDataBytes  int64 `json:"expanded_data_bytes"`
	// EStargzBytes and EStargzOptimizedBytes are the sizes of the image's
	// layers converted to eStargz, plain and optimized for the workload
	// (PrioritizedFiles files first).
	EStargzBytes          int64 `json:"estargz_bytes,omitempty"`
	EStargzOptimizedBytes int64 `json:"estargz_optimized_bytes,omitempty"`
	PrioritizedFiles      int   `json:"prioritized_files,omitempty"`
}

// Profile is one emulated link.
type Profile struct {
	Name      string  `json:"name"`
	RateBits  int64   `json:"rate_bits"`
	RTTMillis float64 `json:"rtt_ms"`
	Label     string  `json:"label"`
}

// Sample is one measured start.
type Sample struct {
	// FirstLine is the time from the command to the workload's first line
	// of output; Total until the command returned.
	FirstLine time.Duration `json:"first_line_ns"`
	Total     time.Duration `json:"total_ns"`
	// Ready is when strata said the container's root was ready (strata
	// run's own report on stderr): the rest until FirstLine is the
	// workload, with its lazy reads.
	Ready time.Duration `json:"ready_ns,omitempty"`
	// LinkBytes crossed the link towards the node (payload, as counted by
	// the proxy); LinkPackets the veth counter of the same (headers too).
	LinkBytes int64 `json:"link_bytes"`
	VethBytes int64 `json:"veth_bytes,omitempty"`
	// PeakDiskBytes is the most the node's disk grew during the run.
	PeakDiskBytes int64 `json:"peak_disk_bytes"`
	// Conns is the number of TCP connections the node opened over the link;
	// Requests the HTTP requests strata's registry served (strata systems
	// only), BlobRequests those of the blob route.
	Conns        int64 `json:"conns"`
	Requests     int64 `json:"requests,omitempty"`
	BlobRequests int64 `json:"blob_requests,omitempty"`
	// BackgroundBytes crossed the link, and BackgroundTime passed, while
	// the node completed in the background the files the run before read
	// (warm starts, which wait for that untimed).
	BackgroundBytes int64         `json:"background_bytes,omitempty"`
	BackgroundTime  time.Duration `json:"background_ns,omitempty"`
	Error           string        `json:"error,omitempty"`
}

// Start is every sample of one system starting one image over one profile.
type Start struct {
	Image   string   `json:"image"`
	Profile string   `json:"profile"`
	System  string   `json:"system"`
	Samples []Sample `json:"samples"`

	FirstLine Stat `json:"first_line_s"`
	Total     Stat `json:"total_s"`
	Ready     Stat `json:"ready_s"`
	LinkBytes Stat `json:"link_bytes"`
	PeakDisk  Stat `json:"peak_disk_bytes"`
	Conns     Stat `json:"conns"`
	Requests  Stat `json:"requests"`
	// Background: Sample.BackgroundBytes.
	Background Stat `json:"background_bytes"`
	// FetchedFraction is LinkBytes over the image's compressed size.
	FetchedFraction float64 `json:"fetched_fraction"`
	Failures        int     `json:"failures"`
}

// Limit is the physical limit of starting an image's workload over one
// profile: what the workload reads at start, compressed, at link speed,
// plus round trips, plus starting it from a local copy.
type Limit struct {
	Image   string `json:"image"`
	Profile string `json:"profile"`
	// ReadBytes are the file bytes the workload made the kernel read
	// (page granular, readahead off), Compressed the same gzip-compressed.
	ReadBytes       int64   `json:"read_bytes"`
	CompressedBytes int64   `json:"compressed_bytes"`
	FilesOpened     int     `json:"files_opened"`
	RoundTrips      int     `json:"round_trips"`
	LocalSeconds    float64 `json:"local_start_s"`
	Seconds         float64 `json:"limit_s"`
}

// Read is the read throughput of one access pattern through one system.
type Read struct {
	Pattern string    `json:"pattern"` // sequential | random
	System  string    `json:"system"`  // local overlayfs | strata cold | strata warm
	MBps    Stat      `json:"mb_per_s"`
	Ratio   float64   `json:"ratio_to_local"`
	Bytes   int64     `json:"bytes_per_run"`
	Samples []float64 `json:"samples_mb_per_s"`
	// DaemonCPU is the node daemon's CPU time during a pass (median
	// seconds): near zero when the kernel serves reads by passthrough.
	DaemonCPU float64 `json:"daemon_cpu_s,omitempty"`
}

// Stat is the median, minimum and maximum of some samples.
type Stat struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// Of summarises xs.
func Of(xs []float64) Stat {
	if len(xs) == 0 {
		return Stat{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Stat{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// Summarise fills the statistics of st from its successful samples.
func (st *Start) Summarise(compressed int64) {
	var fl, tot, lb, pd, cn, rq, rd, bg []float64
	st.Failures = 0
	for _, s := range st.Samples {
		if s.Error != "" {
			st.Failures++
			continue
		}
		fl = append(fl, s.FirstLine.Seconds())
		tot = append(tot, s.Total.Seconds())
		lb = append(lb, float64(s.LinkBytes))
		pd = append(pd, float64(s.PeakDiskBytes))
		cn = append(cn, float64(s.Conns))
		rq = append(rq, float64(s.Requests))
		if s.BackgroundTime > 0 {
			bg = append(bg, float64(s.BackgroundBytes))
		}
		if s.Ready > 0 {
			rd = append(rd, s.Ready.Seconds())
		}
	}
	st.Ready = Of(rd)
	st.FirstLine, st.Total, st.LinkBytes, st.PeakDisk = Of(fl), Of(tot), Of(lb), Of(pd)
	st.Conns, st.Requests, st.Background = Of(cn), Of(rq), Of(bg)
	if compressed > 0 {
		st.FetchedFraction = st.LinkBytes.Median / float64(compressed)
	}
}

// Find returns the start result of system on image and profile.
func (r *Report) Find(image, profile, system string) *Start {
	for i := range r.Start {
		s := &r.Start[i]
		if s.Image == image && s.Profile == profile && s.System == system {
			return s
		}
	}
	return nil
}

// FindLimit returns the physical limit of image on profile.
func (r *Report) FindLimit(image, profile string) *Limit {
	for i := range r.Limits {
		if r.Limits[i].Image == image && r.Limits[i].Profile == profile {
			return &r.Limits[i]
		}
	}
	return nil
}

// Load reads a report saved by Write.
func Load(dir string) (*Report, error) {
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		return nil, err
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	return &r, nil
}

// Write saves results.json, results.md and the charts in dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	charts, err := r.Charts(dir)
	if err != nil {
		return fmt.Errorf("charts: %w", err)
	}
	return os.WriteFile(filepath.Join(dir, "results.md"), []byte(r.Markdown(charts)), 0o644)
}
