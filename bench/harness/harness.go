// Package harness runs strata's benchmarks: it builds strata and the
// images, starts the registries behind an emulated link, and measures
// every system from a clean state several times, in one run, so that
// ratios are taken against baselines measured side by side.
//
// Start time (issues 5 and 6): the time from the command to the
// workload's first line of output, for containerd's normal pull and run,
// strata's full-pull fallback, strata's lazy start on a fresh node (cold)
// and again on the same node (warm), against the physical limit of the
// link. Read throughput (issue 4): the same files through a strata mount,
// cold and warm, against a local overlayfs.
package harness

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/strata-oci/strata/bench/link"
	"github.com/strata-oci/strata/bench/report"
)

// Config is what to measure.
type Config struct {
	// Repo is the root of strata's source tree (strata is built from it).
	Repo string
	// WorkParent is where the work directory is made (default os.TempDir()).
	WorkParent string
	// Runs is the number of samples of every system on every image and
	// profile; a system whose samples there have taken longer than Budget
	// stops after MinRuns (long pulls on slow links).
	Runs     int
	MinRuns  int
	Budget   time.Duration
	Profiles []link.Profile
	// ReadProfile is the link of the read benchmark and the tree walk
	// (zero: loopback).
	ReadProfile link.Profile
	Images      []string
	// Systems selects start-time systems (report.SystemOrder names;
	// "strata-lazy-cold" and "strata-lazy-warm" are measured together).
	Systems []string
	// Limit measures the physical limit of every image and profile.
	Limit bool
	// ReadRuns, ReadFiles and ReadFileSize shape the read benchmark;
	// ReadRuns 0 skips it.
	ReadRuns     int
	ReadFiles    int
	ReadFileSize int64
	// Keep leaves the work directory behind.
	Keep    bool
	Command string
	Log     io.Writer
}

// wants reports whether the start-time system sys is to be measured.
func (c Config) wants(sys string) bool { return len(c.Systems) == 0 || slices.Contains(c.Systems, sys) }

// needDist reports whether a system needs the CNCF registry.
func (c Config) needDist() bool {
	return c.wants(report.Containerd) || c.wants(report.StrataFallback) || c.wants(report.StrataReferrers) || c.wantsMirror() || c.wantsStargz()
}

// wantsMirror reports whether a system through strata's mirror is measured.
func (c Config) wantsMirror() bool {
	return c.wants(report.StrataMirrorFirst) || c.wants(report.StrataMirrorSecond)
}

// Tools lists the programs the benchmarks of c run.
func (c Config) Tools() []string {
	t := []string{"ip", "tc", "nsenter", "skopeo", "runc", "mkfs.ext4", "findmnt", "mount", "tar", "go"}
	if c.wants(report.Containerd) || c.wantsStargz() {
		t = append(t, "containerd", "ctr", "containerd-shim-runc-v2")
	}
	if c.Limit || c.wants(report.StargzOptimized) {
		t = append(t, "strace", "chroot", "blockdev", "cp")
	}
	return t
}

// Run measures everything cfg asks for and tears down what it set up, even
// when it fails or ctx is cancelled.
func Run(ctx context.Context, cfg Config) (rep *report.Report, err error) {
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if cfg.Runs < 1 {
		cfg.Runs = 1
	}
	if cfg.MinRuns < 1 || cfg.MinRuns > cfg.Runs {
		cfg.MinRuns = cfg.Runs
	}
	if cfg.Budget <= 0 {
		cfg.Budget = time.Duration(1<<63 - 1)
	}
	rep = &report.Report{Started: time.Now(), Command: cfg.Command, Runs: cfg.Runs, MinRuns: cfg.MinRuns, Budget: cfg.Budget, Host: host(cfg.Repo)}
	e, err := setup(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := e.Close(context.WithoutCancel(ctx)); cerr != nil && err == nil {
			err = fmt.Errorf("teardown: %w", cerr)
		}
	}()
	for _, p := range cfg.Profiles {
		rep.Profiles = append(rep.Profiles, report.Profile{Name: p.Name, RateBits: p.RateBits, RTTMillis: p.RTTMillis, Label: p.String()})
	}

	var images []*image
	for _, name := range cfg.Images {
		spec, ok := imageSpecs[name]
		if !ok {
			return nil, fmt.Errorf("unknown image %q", name)
		}
		im, err := e.buildImage(ctx, name, spec)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", name, err)
		}
		addrs := []string{e.strataProxy.Addr()}
		if e.distProxy != nil {
			addrs = append(addrs, e.distProxy.Addr())
		}
		for _, addr := range addrs {
			if err := e.push(ctx, im.layout, addr+"/"+im.repo()+":latest"); err != nil {
				return nil, fmt.Errorf("push %s: %w", name, err)
			}
		}
		ixBytes, dataBytes, err := e.awaitExpansion(ctx, im.repo(), im.layers)
		if err != nil {
			return nil, err
		}
		if cfg.wants(report.StrataReferrers) {
			// A repository of its own: the others in the CNCF registry stay
			// without expansion (strata-fallback must pull them whole).
			if err := e.push(ctx, im.layout, e.referrersAddr()+"/"+im.repo()+":latest"); err != nil {
				return nil, fmt.Errorf("push %s: %w", name, err)
			}
			if im.expandErr = e.expandAt(ctx, e.referrersAddr(), im); im.expandErr != nil {
				e.logf("  %s: strata expand on the CNCF registry failed: %v", im.Name, im.expandErr)
			}
		}
		if cfg.wants(report.StrataProfiled) || cfg.wants(report.StrataNewVersion) {
			if im.profileErr = e.recordProfile(ctx, im); im.profileErr != nil {
				e.logf("  %s: recording its start-up profile failed: %v", im.Name, im.profileErr)
			}
		}
		images = append(images, im)
		rep.Images = append(rep.Images, report.Image{Name: im.Name, Description: im.Description, Layers: len(im.layers),
			CompressedBytes: im.compressed, UnpackedBytes: im.unpacked, Workload: im.Args, WorkloadLabel: im.Label,
			ExpandedIndexBytes: ixBytes, ExpandedDataBytes: dataBytes})
	}

	if cfg.Limit {
		for _, im := range images {
			if err := e.limits(ctx, im, cfg, rep); err != nil {
				return nil, fmt.Errorf("physical limit of %s: %w", im.Name, err)
			}
		}
	}
	if cfg.wantsStargz() {
		for i, im := range images {
			if err := e.prepareStargz(ctx, im, &rep.Images[i]); err != nil {
				return nil, fmt.Errorf("eStargz of %s: %w", im.Name, err)
			}
		}
	}

	want := cfg.wants
	for _, p := range cfg.Profiles {
		if err := e.shape(ctx, p); err != nil {
			return nil, err
		}
		e.logf("profile %s", p)
		for _, im := range images {
			results := map[string]*report.Start{}
			for _, sys := range report.SystemOrder {
				if want(sys) {
					results[sys] = &report.Start{Image: im.Name, Profile: p.Name, System: sys}
				}
			}
			add := func(sys string, s report.Sample, i int) {
				results[sys].Samples = append(results[sys].Samples, s)
				if s.Error != "" {
					e.logf("  %s %s run %d/%d: FAILED: %s", im.Name, sys, i+1, cfg.Runs, firstLines(s.Error, 6))
					return
				}
				ready := ""
				if s.Ready > 0 {
					ready = fmt.Sprintf(" (root ready at %.3f s)", s.Ready.Seconds())
				}
				e.logf("  %s %-17s run %d/%d: first line %7.3f s%s, exit %7.3f s, %s over the link, peak disk %s",
					im.Name, sys, i+1, cfg.Runs, s.FirstLine.Seconds(), ready, s.Total.Seconds(), report.MB(s.LinkBytes), report.MB(s.PeakDiskBytes))
			}
			// Every system gets Runs samples, in rounds; one whose samples
			// have taken longer than the budget stops after MinRuns.
			spent := map[string]time.Duration{}
			need := func(sys string, i int) bool {
				return want(sys) && (i < cfg.MinRuns || spent[sys] < cfg.Budget)
			}
			timed := func(sys string, f func()) {
				t0 := time.Now()
				f()
				spent[sys] += time.Since(t0)
			}
			for i := range cfg.Runs {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				id := fmt.Sprintf("%s-%s-%d", p.Name, im.Name, i)
				if need(report.Containerd, i) {
					timed(report.Containerd, func() { add(report.Containerd, e.containerdRun(ctx, im, id), i) })
				}
				for _, sys := range []string{report.Stargz, report.StargzOptimized} {
					if need(sys, i) {
						timed(sys, func() { add(sys, e.stargzRun(ctx, im, sys, id), i) })
					}
				}
				if need(report.StrataFallback, i) {
					timed(report.StrataFallback, func() { add(report.StrataFallback, e.strataFallback(ctx, im, id), i) })
				}
				if need(report.StrataReferrers, i) {
					timed(report.StrataReferrers, func() { add(report.StrataReferrers, e.strataReferrers(ctx, im, id), i) })
				}
				if need(report.StrataMirrorFirst, i) || need(report.StrataMirrorSecond, i) {
					var first, second report.Sample
					timed(report.StrataMirrorFirst, func() { first, second = e.strataMirror(ctx, im, id) })
					for sys, s := range map[string]report.Sample{report.StrataMirrorFirst: first, report.StrataMirrorSecond: second} {
						if want(sys) {
							add(sys, s, i)
						}
					}
				}
				if need(report.StrataProfiled, i) {
					timed(report.StrataProfiled, func() { add(report.StrataProfiled, e.strataProfiled(ctx, im, id), i) })
				}
				if need(report.StrataNewVersion, i) {
					timed(report.StrataNewVersion, func() { add(report.StrataNewVersion, e.strataNewVersion(ctx, im, id), i) })
				}
				if need(report.StrataCold, i) || need(report.StrataWarm, i) {
					var cold, warm report.Sample
					timed(report.StrataCold, func() { cold, warm = e.strataLazy(ctx, im, id) })
					if want(report.StrataCold) {
						add(report.StrataCold, cold, i)
					}
					if want(report.StrataWarm) {
						add(report.StrataWarm, warm, i)
					}
				}
			}
			for _, sys := range report.SystemOrder {
				if st := results[sys]; st != nil {
					size := im.compressed
					if n := im.stargzBytes[sys]; n > 0 {
						size = n // the fraction of the eStargz image
					}
					st.Summarise(size)
					rep.Start = append(rep.Start, *st)
				}
			}
		}
	}

	if cfg.ReadRuns > 0 {
		rp := cfg.ReadProfile
		if rp.Name == "" {
			rp = link.Profiles[0]
		}
		rep.ReadLink = rp.String()
		if err := e.shape(ctx, rp); err != nil {
			return nil, err
		}
		if rep.Reads, err = e.readBench(ctx, cfg.ReadRuns, cfg.ReadFiles, cfg.ReadFileSize); err != nil {
			return nil, fmt.Errorf("read benchmark: %w", err)
		}
		if len(images) > 0 {
			if rep.Trees, err = e.treeBench(ctx, images[0], cfg.ReadRuns); err != nil {
				return nil, fmt.Errorf("tree walk: %w", err)
			}
		}
	}
	rep.Notes = notes
	rep.Duration = time.Since(rep.Started)
	return rep, nil
}

// limits measures what im's workload reads at start and its local start
// time, and computes its physical limit on every profile.
func (e *env) limits(ctx context.Context, im *image, cfg Config, rep *report.Report) error {
	e.logf("physical limit of %s: what the workload reads (strace, mincore) and its local start (runc)", im.Name)
	l, err := e.unpackLocal(ctx, im.Name, im.rootfs)
	if err != nil {
		return err
	}
	defer l.remove()
	sr, err := e.measureReads(ctx, l, im.Args)
	if err != nil {
		return err
	}
	times, err := e.localStart(ctx, l, im.Args, im.Want, cfg.Runs)
	if err != nil {
		return fmt.Errorf("local start: %w", err)
	}
	var secs []float64
	for _, t := range times {
		secs = append(secs, t.Seconds())
	}
	localS := report.Of(secs).Median
	im.readPaths = sr.paths
	e.logf("  %s reads %s at start (%s gzip) from %d files; starts locally with runc in %s",
		im.Name, report.MB(sr.readBytes), report.MB(sr.compressed), sr.files, report.Secs(localS))
	for _, p := range cfg.Profiles {
		lim := report.Limit{Image: im.Name, Profile: p.Name, ReadBytes: sr.readBytes, CompressedBytes: sr.compressed,
			FilesOpened: sr.files, RoundTrips: report.LimitRTTs, LocalSeconds: localS}
		lim.Seconds = localS + float64(lim.RoundTrips)*p.RTTMillis/1000
		if p.RateBits > 0 {
			lim.Seconds += float64(sr.compressed) * 8 / float64(p.RateBits)
		}
		rep.Limits = append(rep.Limits, lim)
	}
	return nil
}

var notes = []string{
	"Every system runs against registries inside a network namespace made for the run, reached through a veth pair shaped with tc tbf (both directions) and a TCP proxy on the node side that adds the round-trip time (half each way, plus one round trip for each new connection's handshake). The proxy runs over the veth's own low RTT, so TCP slow start is not emulated; throughput and round trips are.",
	"Bytes over the link are the payload bytes the proxy delivered to the node (registry responses), not counting TCP/IP headers.",
	"Peak node disk is the largest growth of the node's disk (an ext4 file system of its own, sampled every 20 ms with statfs) during the run: containerd's content store and snapshots, strata's node root (cache, unpacked layers, container upper).",
	"containerd pulls from the CNCF distribution registry, strata's fallback too; strata's lazy start uses strata's registry. Both registries run side by side behind the same link.",
	"strata-mirror-first and strata-mirror-second go through a strata registry serving as a pull-through mirror of the CNCF registry, in the registries' namespace behind the same link as the others; the mirror reaches its upstream through a proxy of its own inside that namespace, with the profile's RTT and rate. Their bytes over the link are what the node received from the mirror; what the mirror fetched from its upstream is in the run's log.",
	"strata-lazy-warm runs on the node of the cold start once that node has put the files the cold start read whole into its cache, which it does in the background when it is quiet (docs/architecture.md); the harness waits for that, untimed, and shows what it fetched as \"before, background\". The read benchmark's warm passes wait likewise.",
}

// host describes this machine.
func host(repo string) report.Host {
	h := report.Host{CPUs: runtime.NumCPU()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.Kernel = strings.TrimSpace(string(b))
	}
	cmd := exec.Command("git", "rev-parse", "--short", "HEAD")
	cmd.Dir = repo
	if out, err := cmd.Output(); err == nil {
		h.Commit = strings.TrimSpace(string(out))
		cmd = exec.Command("git", "status", "--porcelain", "--untracked-files=no")
		cmd.Dir = repo
		if out, err := cmd.Output(); err == nil && len(out) > 0 {
			h.Commit += " (with uncommitted changes)"
		}
	}
	return h
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n    ")
}
