// Command bench is strata's benchmark harness: one command that builds
// strata, makes the images, starts the registries behind an emulated link
// and measures, side by side and from a clean state every time, how long
// containerd, strata's full-pull fallback and strata's lazy start take to
// run a workload, and how fast files read through a strata mount.
//
//	go run ./bench [-quick] [-out bench/results/DATE]
//	go run ./bench -render DIR   # results.md and charts again from DIR/results.json
//
// It needs root (network namespaces, tc, mounts, runc). Results go to the
// output folder as results.json, results.md and PNG charts; the tables are
// printed too. See docs/benchmarks.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/strata-oci/strata/bench/harness"
	"github.com/strata-oci/strata/bench/link"
	"github.com/strata-oci/strata/bench/report"
)

func main() {
	if len(os.Args) == 3 && os.Args[1] == "-render" {
		// Render results.md and the charts again from results.json.
		rep, err := report.Load(os.Args[2])
		if err == nil {
			err = rep.Write(os.Args[2])
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	cfg, out, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, out); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// parseFlags turns the command line into a harness configuration and the
// output folder.
func parseFlags(args []string) (harness.Config, string, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "a quick run (about 3 minutes): the python image, loopback and regional profiles, 3 runs, one read pass")
	out := fs.String("out", "", "results folder (default bench/results/DATE)")
	runs := fs.Int("runs", 0, "samples of every system on every image and profile (default 5, quick 3)")
	minRuns := fs.Int("min-runs", 3, "samples of a system whose samples took longer than -budget")
	budget := fs.Duration("budget", 90*time.Second, "time after which a system on one image and profile stops at -min-runs samples")
	profiles := fs.String("profiles", "", "comma-separated link profiles: loopback, datacenter, regional, edge (default all; quick: loopback,regional)")
	images := fs.String("images", "", "comma-separated images: python, python-layers, gcc, tiny (default python,python-layers,gcc; quick: python)")
	systems := fs.String("systems", "", "comma-separated start-time systems (default all): containerd, stargz, stargz-optimized, strata-fallback, strata-referrers-cold, strata-mirror-first, strata-mirror-second (measured together), strata-lazy-cold, strata-lazy-profiled, strata-lazy-newversion, strata-lazy-warm")
	readRuns := fs.Int("read-runs", -1, "runs of the read benchmark, 0 to skip (default 3, quick 1)")
	readFiles := fs.Int("read-files", 4, "files in the read benchmark")
	readSize := fs.Int64("read-mib", 64, "size of each read-benchmark file in MiB")
	readProfile := fs.String("read-profile", "loopback", "link profile of the read benchmark and the tree walk")
	noLimit := fs.Bool("no-limit", false, "skip measuring the physical limit")
	keep := fs.Bool("keep", false, "keep the work directory")
	work := fs.String("work", "/var/tmp", "parent of the work directory (node disk image, registries)")
	if err := fs.Parse(args); err != nil {
		return harness.Config{}, "", err
	}
	cfg := harness.Config{
		Runs: 5, MinRuns: *minRuns, Budget: *budget, Images: []string{"python", "python-layers", "gcc"},
		Systems: split(*systems), Limit: !*noLimit,
		ReadRuns: 3, ReadFiles: *readFiles, ReadFileSize: *readSize << 20,
		Keep: *keep, WorkParent: *work, Log: os.Stderr,
		Command: "go run ./bench " + strings.Join(args, " "),
	}
	names := []string{"loopback", "datacenter", "regional", "edge"}
	if *quick {
		cfg.Runs, cfg.ReadRuns = 3, 1
		cfg.Images = []string{"python"}
		names = []string{"loopback", "regional"}
	}
	if *runs > 0 {
		cfg.Runs = *runs
	}
	if *images != "" {
		cfg.Images = split(*images)
	}
	if *readRuns >= 0 {
		cfg.ReadRuns = *readRuns
	}
	if *profiles != "" {
		names = split(*profiles)
	}
	for _, n := range names {
		p, ok := link.Lookup(n)
		if !ok {
			return cfg, "", fmt.Errorf("unknown profile %q", n)
		}
		cfg.Profiles = append(cfg.Profiles, p)
	}
	p, ok := link.Lookup(*readProfile)
	if !ok {
		return cfg, "", fmt.Errorf("unknown profile %q", *readProfile)
	}
	cfg.ReadProfile = p
	cfg.Command = strings.TrimSpace(cfg.Command)
	return cfg, *out, nil
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// run measures and writes the results.
func run(ctx context.Context, cfg harness.Config, out string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces, tc, mounts, runc)")
	}
	for _, tool := range cfg.Tools() {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (bash scripts/setup.sh installs what the benchmarks need)", tool)
		}
	}
	repo, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return fmt.Errorf("finding the module root (run from strata's tree): %w", err)
	}
	cfg.Repo = strings.TrimSpace(string(repo))
	if out == "" {
		out = filepath.Join(cfg.Repo, "bench", "results", time.Now().Format("2006-01-02T1504"))
	}
	rep, err := harness.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if err := rep.Write(out); err != nil {
		return err
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		return err
	}
	fmt.Println(string(md))
	fmt.Fprintf(os.Stderr, "bench: results in %s\n", out)
	return nil
}
