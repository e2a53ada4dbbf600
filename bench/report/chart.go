package report

import (
	"fmt"
	"image/color"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

var palette = map[string]color.Color{
	Containerd:         color.RGBA{0x4c, 0x72, 0xb0, 0xff},
	Stargz:             color.RGBA{0x81, 0x72, 0xb3, 0xff},
	StargzOptimized:    color.RGBA{0xb0, 0x9c, 0xd8, 0xff},
	StrataFallback:     color.RGBA{0x8c, 0x8c, 0x8c, 0xff},
	StrataCold:         color.RGBA{0xdd, 0x84, 0x52, 0xff},
	StrataReferrers:    color.RGBA{0xe8, 0xb0, 0x6a, 0xff},
	StrataMirrorFirst:  color.RGBA{0x9a, 0x6f, 0x3a, 0xff},
	StrataMirrorSecond: color.RGBA{0xd6, 0x9a, 0x9c, 0xff},
	StrataWarm:         color.RGBA{0x55, 0xa8, 0x68, 0xff},
	StrataProfiled:     color.RGBA{0xc4, 0x4e, 0x52, 0xff},
	"physical limit":   color.RGBA{0x20, 0x20, 0x20, 0xff},
	"local overlayfs":  color.RGBA{0x4c, 0x72, 0xb0, 0xff},
	"strata cold":      color.RGBA{0xdd, 0x84, 0x52, 0xff},
	"strata warm":      color.RGBA{0x55, 0xa8, 0x68, 0xff},
}

type bar struct {
	name      string
	v, lo, hi float64
	label     string
}

// Charts draws one PNG per image and profile (start times) and one of the
// read throughputs into dir, and returns their file names.
func (r *Report) Charts(dir string) ([]string, error) {
	var names []string
	for _, im := range r.Images {
		for _, p := range r.Profiles {
			var bars []bar
			for _, sys := range SystemOrder {
				st := r.Find(im.Name, p.Name, sys)
				if st == nil {
					continue
				}
				if st.FirstLine.N == 0 {
					bars = append(bars, bar{sys, 0, 0, 0, fmt.Sprintf("failed (%d/%d)", st.Failures, len(st.Samples))})
					continue
				}
				bars = append(bars, bar{sys, st.FirstLine.Median, st.FirstLine.Min, st.FirstLine.Max, Secs(st.FirstLine.Median)})
			}
			if l := r.FindLimit(im.Name, p.Name); l != nil && len(bars) > 0 {
				bars = append(bars, bar{"physical limit", l.Seconds, l.Seconds, l.Seconds, Secs(l.Seconds)})
			}
			if len(bars) == 0 {
				continue
			}
			name := fmt.Sprintf("start-%s-%s.png", im.Name, p.Name)
			title := fmt.Sprintf("%s: time to first output line, %s", im.Name, p.Label)
			if err := drawBars(filepath.Join(dir, name), title, "seconds (median, min–max)", bars); err != nil {
				return nil, err
			}
			names = append(names, name)
		}
	}
	if name, err := r.summaryChart(dir); err != nil {
		return nil, err
	} else if name != "" {
		names = append([]string{name}, names...)
	}
	for _, pattern := range []string{"sequential", "random"} {
		var bars []bar
		for _, rd := range r.Reads {
			if rd.Pattern == pattern {
				bars = append(bars, bar{rd.System, rd.MBps.Median, rd.MBps.Min, rd.MBps.Max, fmt.Sprintf("%.0f MB/s", rd.MBps.Median)})
			}
		}
		if len(bars) == 0 {
			continue
		}
		name := "read-" + pattern + ".png"
		if err := drawBars(filepath.Join(dir, name), pattern+" reads, page cache dropped", "MB/s (median, min–max)", bars); err != nil {
			return nil, err
		}
		names = append(names, name)
	}
	return names, nil
}

type errXY struct {
	plotter.XYs
	plotter.YErrors
}

func drawBars(file, title, ylabel string, bars []bar) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	var names []string
	var pts plotter.XYs
	var errs plotter.YErrors
	var labels []string
	top := 0.0
	for i, b := range bars {
		bc, err := plotter.NewBarChart(plotter.Values{b.v}, vg.Points(40))
		if err != nil {
			return err
		}
		bc.XMin = float64(i)
		if c, ok := palette[b.name]; ok {
			bc.Color = c
		}
		bc.LineStyle.Width = 0
		p.Add(bc)
		names = append(names, b.name)
		pts = append(pts, plotter.XY{X: float64(i), Y: b.v})
		errs = append(errs, struct{ Low, High float64 }{b.v - b.lo, b.hi - b.v})
		labels = append(labels, b.label)
		top = max(top, b.hi)
	}
	eb, err := plotter.NewYErrorBars(errXY{pts, errs})
	if err != nil {
		return err
	}
	p.Add(eb)
	lp := make(plotter.XYs, len(pts))
	for i := range pts {
		lp[i] = plotter.XY{X: pts[i].X, Y: bars[i].hi + top*0.02}
	}
	lb, err := plotter.NewLabels(plotter.XYLabels{XYs: lp, Labels: labels})
	if err != nil {
		return err
	}
	for i := range lb.TextStyle {
		lb.TextStyle[i].XAlign = -0.5
	}
	p.Add(lb)
	p.Y.Max = top * 1.15
	p.NominalX(names...)
	return p.Save(vg.Length(120+110*len(bars))*vg.Millimeter/4, 90*vg.Millimeter, file)
}

var imageColors = []color.Color{
	color.RGBA{0xdd, 0x84, 0x52, 0xff},
	color.RGBA{0x81, 0x72, 0xb3, 0xff},
	color.RGBA{0x93, 0x78, 0x60, 0xff},
	color.RGBA{0x55, 0xa8, 0x68, 0xff},
}

// pale mixes c with white.
func pale(c color.Color) color.Color {
	r, g, b, _ := c.RGBA()
	mix := func(v uint32) uint8 { return uint8((v>>8 + 2*255) / 3) }
	return color.RGBA{mix(r), mix(g), mix(b), 0xff}
}

// summaryChart draws strata's lazy cold start as a speed-up over
// containerd, by profile and image, with the 10x target as a line.
func (r *Report) summaryChart(dir string) (string, error) {
	p := plot.New()
	p.Title.Text = "strata lazy start on a fresh node: speed-up over containerd pull + run"
	p.Y.Label.Text = "containerd time ÷ strata time (median)"
	p.Y.Min = 0
	p.Legend.Top = true
	var profiles []string
	for _, pr := range r.Profiles {
		profiles = append(profiles, pr.Name)
	}
	// One bar per image and strata system (cold without a profile, pale;
	// with one, full colour), grouped by link profile.
	type series struct {
		label string
		vals  plotter.Values
		color color.Color
	}
	var all []series
	top := 10.0
	for i, im := range r.Images {
		for _, sys := range []string{StrataCold, StrataProfiled} {
			vals := make(plotter.Values, len(r.Profiles))
			any := false
			for k, pr := range r.Profiles {
				base, st := r.Find(im.Name, pr.Name, Baseline), r.Find(im.Name, pr.Name, sys)
				if base != nil && st != nil && base.FirstLine.N > 0 && st.FirstLine.N > 0 {
					vals[k] = base.FirstLine.Median / st.FirstLine.Median
					top = max(top, vals[k])
					any = true
				}
			}
			if !any {
				continue
			}
			c := imageColors[i%len(imageColors)]
			label := im.Name + ", profiled"
			if sys == StrataCold {
				c, label = pale(c), im.Name+", cold"
			}
			all = append(all, series{label, vals, c})
		}
	}
	w := vg.Points(min(18, 110/float64(max(len(all), 1))))
	drawn := 0
	for i, sr := range all {
		bc, err := plotter.NewBarChart(sr.vals, w)
		if err != nil {
			return "", err
		}
		bc.Color = sr.color
		bc.LineStyle.Width = 0
		bc.Offset = w * vg.Length(float64(i)-float64(len(all)-1)/2)
		p.Add(bc)
		p.Legend.Add(sr.label, bc)
		drawn++
	}
	if drawn == 0 {
		return "", nil
	}
	target := plotter.NewFunction(func(float64) float64 { return 10 })
	target.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	target.Width = vg.Points(1)
	p.Add(target)
	p.Legend.Add("target (regional): 10x", target)
	p.Y.Max = top * 1.5 // room for the legend above the target line
	p.X.Min, p.X.Max = -0.6, float64(len(profiles))-0.4
	p.NominalX(profiles...)
	name := "summary-speedup.png"
	return name, p.Save(160*vg.Millimeter, 90*vg.Millimeter, filepath.Join(dir, name))
}
