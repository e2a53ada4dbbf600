package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/nodeapi"
	"github.com/strata-oci/strata/internal/remote"
)

// parseSize reads sizes like 16MiB, 2GiB, 512k, 1000000.
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40}, {"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12}, {"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"t", 1 << 40}, {"b", 1}}
	ls := strings.ToLower(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(ls, u.suffix) {
			ls, mult = strings.TrimSpace(strings.TrimSuffix(ls, u.suffix)), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(ls, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("invalid size %q (examples: 16MiB, 2GiB)", s)
	}
	return int64(v * float64(mult)), nil
}

// daemonArgs is how a CLI command starts the node daemon.
func (g *globalFlags) daemonArgs() []string {
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	args := []string{exe, "--root", g.root, "--cache-size", g.cacheSize, "--log-level", g.logLevel, "--fetch-timeout", g.fetchTimeout.String(), "--startup-profiles", g.profiles, "--hosts-dir", g.hostsDir}
	if g.config != "" { // for the daemon's own keys (--idle-timeout, …)
		args = append(args, "--config", configPath(g.config))
	}
	if g.metricsAddr != "" {
		args = append(args, "--metrics-addr", g.metricsAddr)
	}
	return append(args, "daemon")
}

func (g *globalFlags) dial(cmd *cobra.Command) (*nodeapi.Client, error) {
	return nodeapi.Dial(cmd.Context(), g.root, g.daemonArgs())
}

func newDaemonCmd(g *globalFlags) *cobra.Command {
	var idle, linger time.Duration
	var verify string
	cmd := &cobra.Command{
		Use:    "daemon",
		Short:  "Run the node daemon that serves layer mounts (started on demand by other commands)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			size, err := parseSize(g.cacheSize)
			if err != nil {
				return err
			}
			switch g.profiles {
			case node.ProfilesAuto, node.ProfilesUse, node.ProfilesOff:
			default:
				return fmt.Errorf("--startup-profiles: %q is not auto, use or off", g.profiles)
			}
			log := g.logger()
			// One daemon per root: wait for one that is exiting.
			unlock, err := nodeapi.Lock(cmd.Context(), g.root, time.Minute)
			if err != nil {
				return err
			}
			defer unlock()
			m, err := node.Open(cmd.Context(), node.Options{
				Root: g.root, CacheSize: size, Logger: log, FetchTimeout: g.fetchTimeout, Profiles: g.profiles,
				Linger: linger, VerifyLayers: verify,
				Remote: remote.New(remote.Options{Hosts: &remote.Hosts{Dir: g.hostsDir}, Credentials: remote.DockerCredentials(log), Logger: log}),
			})
			if err != nil {
				return err
			}
			if g.metricsAddr != "" {
				stop, err := m.ServeMetrics(g.metricsAddr)
				if err != nil {
					m.Close(cmd.Context())
					return err
				}
				defer stop() // before the lock goes: the next daemon listens there
			}
			return nodeapi.Serve(cmd.Context(), m, nodeapi.ServeOptions{Root: g.root, IdleTimeout: idle, Logger: log})
		},
	}
	cmd.Flags().DurationVar(&idle, "idle-timeout", 30*time.Second, "exit after this long with nothing mounted (0: never)")
	cmd.Flags().StringVar(&verify, "verify-layers", node.VerifyBackground, "check that each lazy layer's expansion is the layer's: background (once the node is quiet, fetch the layer blob, expand it again and compare; a layer that differs is refused and pulled whole), off (trust the expansion's claims)")
	cmd.Flags().DurationVar(&linger, "layer-linger", time.Minute, "keep a lazy layer mounted this long after its last container or mount ends, so the next one finds the kernel's caches of it warm (0: unmount at once)")
	return cmd
}

func newPullCmd(g *globalFlags) *cobra.Command {
	var plain bool
	cmd := &cobra.Command{
		Use:   "pull [--plain-http] REF",
		Short: "Resolve an image and prepare its layers (layer mounts, or download and unpack)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			var img *node.Image
			err = withProgress(cmd.Context(), c, func() (err error) {
				img, err = c.Pull(cmd.Context(), nodeapi.PullRequest{Ref: args[0], PlainHTTP: plain})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "%s: %s, %d layers (%s)\n", img.Ref, img.Digest, len(img.Layers), modeText(img))
			return nil
		},
	}
	cmd.Flags().BoolVar(&plain, "plain-http", false, "reach the registry over plain HTTP")
	return cmd
}

func modeText(img *node.Image) string {
	if img.Mode == node.ModeLazy {
		if img.Source == node.SourceReferrers {
			return "lazy: expansion referrers"
		}
		return "lazy: layer mounts"
	}
	return "fallback: full pull — " + img.Reason
}

func newMountCmd(g *globalFlags) *cobra.Command {
	var plain bool
	cmd := &cobra.Command{
		Use:   "mount [--plain-http] REF DIR",
		Short: "Mount an image's filesystem read-only at DIR, fetching file data lazily",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir, err := filepath.Abs(args[1])
			if err != nil {
				return err
			}
			if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
				return fmt.Errorf("mount point %s is not a directory", dir)
			}
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			l, err := c.Acquire(cmd.Context(), nodeapi.AcquireRequest{ID: "mount:" + dir, Ref: args[0], PlainHTTP: plain, Union: dir})
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "mounted %s at %s (%s)\n", l.Ref, dir, modeText(l.Image))
			return nil
		},
	}
	cmd.Flags().BoolVar(&plain, "plain-http", false, "reach the registry over plain HTTP")
	return cmd
}

func newUmountCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "umount DIR",
		Short: "Unmount an image mounted with strata mount",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir, err := filepath.Abs(args[0])
			if err != nil {
				return err
			}
			c, err := nodeapi.Dial(cmd.Context(), g.root, nil)
			if err != nil {
				return fmt.Errorf("%s is not mounted (%v)", dir, err)
			}
			return c.Unmount(cmd.Context(), nodeapi.UnmountRequest{Dir: dir})
		},
	}
}

func newDFCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "df",
		Short: "Show per-layer bytes fetched against totals, and cache use",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			r, err := c.DF(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "LAYER\tMODE\tMOUNTED\tFETCHED\tTOTAL\tFETCHED%")
			for _, l := range r.Layers {
				pct := "-"
				if l.Total > 0 {
					pct = fmt.Sprintf("%.1f%%", 100*float64(l.Fetched)/float64(l.Total))
				}
				fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\t%s\n", short(l.Digest), l.Mode, l.Mounted, human(l.Fetched), human(l.Total), pct)
			}
			tw.Flush()
			fmt.Printf("cache: %s in %d items (limit %s)\n", human(r.CacheBytes), r.CacheItems, human(r.CacheLimit))
			if r.UnpackedBytes > 0 {
				fmt.Printf("unpacked layers: %s (count against the same limit: the cache holds that much less)\n", human(r.UnpackedBytes))
			}
			if bg := r.Background; bg != nil && (bg.Pending > 0 || bg.Files > 0 || bg.Failed > 0) {
				fmt.Printf("background: %d files completed into the cache (%s, %s fetched), %d pending, %d failed\n",
					bg.Files, human(bg.Bytes), human(bg.Fetched), bg.Pending, bg.Failed)
			}
			return nil
		},
	}
}

func newImagesCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "images",
		Short: "List pulled images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			imgs, err := c.Images(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REFERENCE\tDIGEST\tLAYERS\tMODE\tPULLED")
			for _, img := range imgs {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", img.Ref, short(img.Digest.String()), len(img.Layers), img.Mode, img.Pulled.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
}

func newRmiCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "rmi REF...",
		Short: "Remove pulled images",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			for _, ref := range args {
				r, err := c.RemoveImage(cmd.Context(), ref)
				if err != nil {
					return err
				}
				fmt.Printf("%s removed: %s\n", ref, freed(r))
			}
			return nil
		},
	}
}

func newGCCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "gc",
		Short: "Remove the layers and cache items no image or container uses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			r, err := c.GC(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Println(freed(r))
			return nil
		},
	}
}

func freed(r *node.GCReport) string {
	return fmt.Sprintf("freed %d layers (%s on disk), %d cache items (%s)", r.Layers, human(r.LayerBytes), r.CacheItems, human(r.CacheBytes))
}

func short(d string) string {
	if _, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return hex[:12]
	}
	return d
}

func human(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
