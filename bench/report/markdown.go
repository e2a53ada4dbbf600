package report

import (
	"fmt"
	"strings"
)

// Systems, in the order tables show them. Baseline is the one ratios are
// taken against.
const (
	Containerd     = "containerd"
	StrataFallback = "strata-fallback"
	StrataCold     = "strata-lazy-cold"
	StrataProfiled = "strata-lazy-profiled"
	StrataWarm     = "strata-lazy-warm"
	// StrataReferrers is a lazy start from the CNCF registry, through the
	// expansion referrers strata expand pushed there.
	StrataReferrers = "strata-referrers-cold"
	// StrataMirrorFirst and StrataMirrorSecond are starts through strata's
	// pull-through mirror of the CNCF registry: the first request for the
	// image (the mirror fetches and expands it), and a start on another
	// node once the mirror has it.
	StrataMirrorFirst  = "strata-mirror-first"
	StrataMirrorSecond = "strata-mirror-second"
	// StrataNewVersion is the first start of a new version of an image
	// (one layer added on top) whose previous version has a profile.
	StrataNewVersion = "strata-lazy-newversion"
	Baseline         = Containerd
)

// SystemOrder lists the start-time systems in table order.
var SystemOrder = []string{Containerd, Stargz, StargzOptimized, StrataFallback, StrataReferrers, StrataMirrorFirst, StrataMirrorSecond, StrataCold, StrataProfiled, StrataNewVersion, StrataWarm}

// Describe says what each system measures.
var Describe = map[string]string{
	Containerd:         "containerd 1.6 (Debian): `ctr image pull` + `ctr run --rm`, fresh content store and snapshots",
	StrataFallback:     "strata full pull from the CNCF distribution registry (no layer mounts): download, unpack, run; fresh node",
	StrataCold:         "strata lazy start: fresh node root and cache (its node daemon started before the clock, as containerd's is), image pushed and expanded, no start-up profile (`--startup-profiles off`): every read the workload makes that misses is a round trip",
	StrataProfiled:     "strata lazy start, fresh node root and cache, with the image's start-up profile: an earlier start on another node (before the timed runs) recorded what the workload read and stored it in the registry; the node fetches it with the layer indexes and prefetches it, in parallel, as the layers mount",
	StrataReferrers:    "strata lazy start from the CNCF distribution registry (no layer-mount API, no Referrers API): `strata expand` pushed the expansion there beforehand (untimed), the node finds it through the referrers tag; fresh node root and cache, no start-up profile (`--startup-profiles off`); compare with strata-lazy-cold, the same from strata's registry",
	StrataMirrorFirst:  "strata start through a strata registry serving as pull-through mirror (`--upstream`) of the CNCF registry, the first request for the image: a fresh mirror (empty store) fetches the image from the upstream over a link of its own (a proxy with the profile's RTT and rate), and expands its layers while the node waits (202, bounded), then the node mounts lazily; the node keeps image references as they are (the CNCF registry's) and finds the mirror in a containerd hosts.toml (`--hosts-dir`); fresh node, default `--startup-profiles auto` (it records a profile and stores it in the mirror); compare with containerd, which pulls from the upstream directly",
	StrataMirrorSecond: "strata start through the same mirror on another fresh node once the first start is over: the mirror has the image, its expansion and the profile the first node stored, so this is a profiled lazy start from the mirror; the upstream is not asked (its tag's TTL has not passed)",
	StrataNewVersion:   "strata lazy start, fresh node root and cache, of a new version of the image nobody has run: the image with one small layer added on top (an application's new release over unchanged base layers), pushed as a tag of its own just before (untimed); the registry has no profile of it and answers with the previous version's (derived), recorded before the timed runs; default `--startup-profiles auto` (the start also records the new version's own profile); compare with strata-lazy-profiled (the goal: within 1.2x) and strata-lazy-cold",
	StrataWarm:         "strata lazy start again on the node of the cold start, a new container, once the node has put the files the cold start read whole into its cache (in the background, when quiet; waited for untimed): no network, reads through passthrough",
}

// linkNote names the read link in prose, when it is known.
func linkNote(name string) string {
	if name == "" {
		return ""
	}
	return ": " + name
}

// Markdown renders the report as tables; charts are image files in the
// same folder.
func (r *Report) Markdown(charts []string) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("# strata benchmark, %s\n\n", r.Started.Format("2006-01-02 15:04 MST"))
	w("`%s` on %d CPUs, kernel %s", r.Command, r.Host.CPUs, r.Host.Kernel)
	if r.Host.Commit != "" {
		w(", commit %s", r.Host.Commit)
	}
	w("; %d runs of every system on every image and profile", r.Runs)
	if r.MinRuns < r.Runs {
		w(" (%d when its runs there took over %s)", r.MinRuns, r.Budget)
	}
	w("; took %s.\n\n", r.Duration.Round(1e9))

	w("## Images\n\n| image | layers | compressed (gzip) | unpacked (tar) | strata expansion: index + data | workload |\n|---|---|---|---|---|---|\n")
	for _, im := range r.Images {
		wl := "`" + shellJoin(im.Workload) + "`"
		if im.WorkloadLabel != "" {
			wl = im.WorkloadLabel
		}
		w("| %s | %d | %s | %s | %s + %s | %s |\n", im.Name, im.Layers, MB(im.CompressedBytes), MB(im.UnpackedBytes),
			MB(im.ExpandedIndexBytes), MB(im.ExpandedDataBytes), wl)
	}
	w("\n## Systems\n\n")
	for _, s := range SystemOrder {
		for _, st := range r.Start {
			if st.System == s {
				w("- **%s**: %s\n", s, Describe[s])
				break
			}
		}
	}
	w("- **physical limit**: the file bytes the workload reads at start (measured on a local copy, page-granular, readahead off), gzip-compressed, at link speed, plus %d round trips (connect, manifest, config, data), plus starting the workload with runc from a local unpacked copy\n", limitRTTs)

	for _, im := range r.Images {
		w("\n## Start time: %s\n\n", im.Name)
		w("Time from the command to the workload's first output line; median (min–max) over the runs. For strata, *root ready* is when `strata run` reported the container's root mounted (the rest is runc and the workload, with its lazy reads).\n\n")
		w("| profile | system | first line | min–max | strata: root ready | speed-up vs containerd | ÷ physical limit | over the link | of image | requests (conns) | peak node disk | runs (failed) |\n")
		w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, p := range r.Profiles {
			base := r.Find(im.Name, p.Name, Baseline)
			lim := r.FindLimit(im.Name, p.Name)
			for _, sys := range SystemOrder {
				st := r.Find(im.Name, p.Name, sys)
				if st == nil {
					continue
				}
				if st.FirstLine.N == 0 {
					w("| %s | %s | failed | | | | | | | | | %d (%d) |\n", p.Label, sys, len(st.Samples), st.Failures)
					continue
				}
				vs, vl := "", ""
				if base != nil && base.FirstLine.N > 0 {
					vs = fmt.Sprintf("%.1fx", base.FirstLine.Median/st.FirstLine.Median)
				}
				switch {
				case sys == StrataWarm && lim != nil && lim.LocalSeconds > 0:
					// A warm start needs no network: its floor is the local start.
					vl = fmt.Sprintf("%.1f of local start", st.FirstLine.Median/lim.LocalSeconds)
				case lim != nil && lim.Seconds > 0:
					vl = fmt.Sprintf("%.1f", st.FirstLine.Median/lim.Seconds)
				}
				rq := fmt.Sprintf("(%.0f)", st.Conns.Median)
				if st.Requests.Median > 0 {
					rq = fmt.Sprintf("%.0f (%.0f)", st.Requests.Median, st.Conns.Median)
				}
				link := MB(int64(st.LinkBytes.Median))
				if st.Background.N > 0 {
					// What the node completed in the background before it.
					link += fmt.Sprintf(" (+%s before, background)", MB(int64(st.Background.Median)))
				}
				ready := ""
				if st.Ready.N > 0 {
					ready = Secs(st.Ready.Median)
				}
				w("| %s | %s | **%s** | %s–%s | %s | %s | %s | %s | %.1f%% | %s | %s | %d (%d) |\n",
					p.Label, sys, Secs(st.FirstLine.Median), Secs(st.FirstLine.Min), Secs(st.FirstLine.Max), ready,
					vs, vl, link, 100*st.FetchedFraction, rq, MB(int64(st.PeakDisk.Median)), len(st.Samples), st.Failures)
			}
			if lim != nil {
				w("| %s | physical limit | %s | | | | | %s | | | | |\n", p.Label, Secs(lim.Seconds), MB(lim.CompressedBytes))
			}
		}
	}

	b.WriteString(r.stargzMarkdown())

	if len(r.Limits) > 0 {
		w("\n## Physical limit, measured\n\n| image | profile | read at start | compressed | files opened | round trips | local start (runc) | limit |\n|---|---|---|---|---|---|---|---|\n")
		for _, l := range r.Limits {
			w("| %s | %s | %s | %s | %d | %d | %s | %s |\n", l.Image, l.Profile, MB(l.ReadBytes), MB(l.CompressedBytes), l.FilesOpened, l.RoundTrips, Secs(l.LocalSeconds), Secs(l.Seconds))
		}
	}

	if len(r.Reads) > 0 {
		w("\n## Read throughput\n\nThe same files read through a `strata mount` and from a local overlayfs over an unpacked copy on the same disk; the page cache is dropped before every pass, so warm reads measure the cached files (FUSE passthrough), not the page cache. Median (min–max) MB/s.\n\n")
		w("| pattern | system | MB/s | min–max | ÷ local | bytes per pass | node daemon CPU per pass |\n|---|---|---|---|---|---|---|\n")
		for _, rd := range r.Reads {
			cpu := ""
			if rd.System != "local overlayfs" {
				cpu = fmt.Sprintf("%.2f s", rd.DaemonCPU)
			}
			w("| %s | %s | **%.0f** | %.0f–%.0f | %.2f | %s | %s |\n", rd.Pattern, rd.System, rd.MBps.Median, rd.MBps.Min, rd.MBps.Max, rd.Ratio, MB(rd.Bytes), cpu)
		}
	}

	if len(r.Trees) > 0 {
		w("\n## Tree walk\n\n`tar -cf - usr` of the image's tree into a pipe (every file opened and read, the archive counted): through a fresh `strata mount` (cold: nothing cached, fetched over the read benchmark's link%s), and through the same mount once every file is cached and in the page cache (warm); against a local overlayfs over an unpacked copy, with the page cache dropped (cold) and warm. Median (min–max) MB/s of archive; the ratio is to the local walk of the same temperature.\n\n", linkNote(r.ReadLink))
		w("| walk | system | MB/s | min–max | ÷ local | archive bytes | node daemon CPU per walk |\n|---|---|---|---|---|---|---|\n")
		for _, rd := range r.Trees {
			cpu, ratio := "", ""
			if rd.DaemonCPU > 0 || strings.HasPrefix(rd.System, "strata") {
				cpu = fmt.Sprintf("%.2f s", rd.DaemonCPU)
			}
			if rd.Ratio > 0 {
				ratio = fmt.Sprintf("%.2f", rd.Ratio)
			}
			w("| %s | %s | **%.0f** | %.0f–%.0f | %s | %s | %s |\n", rd.Pattern, rd.System, rd.MBps.Median, rd.MBps.Min, rd.MBps.Max, ratio, MB(rd.Bytes), cpu)
		}
	}

	if len(charts) > 0 {
		w("\n## Charts\n\n")
		for _, c := range charts {
			w("![%s](%s)\n\n", c, c)
		}
	}
	if len(r.Notes) > 0 {
		w("\n## Notes\n\n")
		for _, n := range r.Notes {
			w("- %s\n", n)
		}
	}
	return b.String()
}

// limitRTTs is the number of round trips the physical limit counts: TCP
// connect, manifest, config, then the data.
const limitRTTs = 4

// LimitRTTs is exported for the harness.
const LimitRTTs = limitRTTs

// MB formats a byte count in decimal megabytes.
func MB(n int64) string {
	switch {
	case n >= 10e6:
		return fmt.Sprintf("%.0f MB", float64(n)/1e6)
	case n >= 1e6:
		return fmt.Sprintf("%.1f MB", float64(n)/1e6)
	default:
		return fmt.Sprintf("%.0f kB", float64(n)/1e3)
	}
}

// Secs formats seconds.
func Secs(s float64) string {
	if s < 1 {
		return fmt.Sprintf("%.0f ms", s*1000)
	}
	return fmt.Sprintf("%.2f s", s)
}

// shellJoin quotes args the way a shell user would type them.
func shellJoin(args []string) string {
	var q []string
	for _, a := range args {
		if strings.ContainsAny(a, " \t\"'()$`\\;&|<>*?") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q = append(q, a)
	}
	return strings.Join(q, " ")
}
