package report

import (
	"fmt"
	"strings"
)

// The peer lazy-pull system: stargz-snapshotter with eStargz images
// (bench/stargz builds it).
const (
	Stargz          = "stargz"
	StargzOptimized = "stargz-optimized"
)

func init() {
	Describe[Stargz] = "stargz-snapshotter v0.19.1 as a containerd proxy plugin (default configuration: prefetch and background fetch on), fresh snapshotter root, under a fresh containerd 1.6: rpull of the plain eStargz image (layers mounted from the CNCF registry, nothing downloaded but manifest and config), then `ctr run --rm --snapshotter stargz`"
	Describe[StargzOptimized] = "the same with the eStargz image optimized for the workload: in every layer the files the workload reads at start come first, followed by a prefetch landmark (what stargz's optimizer produces), and the snapshotter prefetches them at mount"
}

// stargzMarkdown compares strata's lazy start with stargz-snapshotter's,
// image by image and profile by profile (empty when no stargz system was
// measured).
func (r *Report) stargzMarkdown() string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	first := func(im, p, sys string) (string, float64) {
		st := r.Find(im, p, sys)
		switch {
		case st == nil:
			return "", 0
		case st.FirstLine.N == 0:
			return "failed", 0
		}
		return fmt.Sprintf("%s (%s)", Secs(st.FirstLine.Median), MB(int64(st.LinkBytes.Median))), st.FirstLine.Median
	}
	ratio := func(a, b float64) string {
		if a <= 0 || b <= 0 {
			return ""
		}
		if a <= b {
			return fmt.Sprintf("%.1fx faster", b/a)
		}
		return fmt.Sprintf("%.1fx slower", a/b)
	}
	for _, im := range r.Images {
		for _, p := range r.Profiles {
			sg, sgS := first(im.Name, p.Name, Stargz)
			so, soS := first(im.Name, p.Name, StargzOptimized)
			if sg == "" && so == "" {
				continue
			}
			if b.Len() == 0 {
				w("\n## strata and stargz-snapshotter\n\nThe images converted to eStargz (stargz's defaults: gzip at best compression, 4 MiB chunks); the optimized one has the files the workload reads at start first in every layer, then a prefetch landmark.\n\n")
				w("| image | gzip | eStargz | eStargz optimized | files first |\n|---|---|---|---|---|\n")
				for _, im := range r.Images {
					if im.EStargzBytes > 0 || im.EStargzOptimizedBytes > 0 {
						w("| %s | %s | %s | %s | %d |\n", im.Name, MB(im.CompressedBytes), mbOrNone(im.EStargzBytes),
							mbOrNone(im.EStargzOptimizedBytes), im.PrioritizedFiles)
					}
				}
				w("\nTime to the first output line, median (bytes over the link).\n\n")
				w("Each strata system against its counterpart: without any knowledge of the workload, strata lazy cold (no start-up profile) against plain eStargz; knowing what the workload reads, strata with its start-up profile against eStargz optimized for the workload.\n\n")
				w("| image | profile | stargz | stargz optimized | strata lazy cold | strata profiled | cold vs stargz | profiled vs stargz optimized |\n|---|---|---|---|---|---|---|---|\n")
			}
			sc, scS := first(im.Name, p.Name, StrataCold)
			sp, spS := first(im.Name, p.Name, StrataProfiled)
			w("| %s | %s | %s | %s | %s | %s | %s | %s |\n", im.Name, p.Label, sg, so, sc, sp, ratio(scS, sgS), ratio(spS, soS))
		}
	}
	return b.String()
}

func mbOrNone(n int64) string {
	if n == 0 {
		return ""
	}
	return MB(n)
}
