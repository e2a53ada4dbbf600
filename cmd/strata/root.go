package main

import (
	"errors"
	"github.com/strata-oci/strata/internal/node"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"
)

// globalFlags are the flags every subcommand shares.
type globalFlags struct {
	root         string
	cacheSize    string
	logLevel     string
	fetchTimeout time.Duration
	profiles     string
}

// exitError carries a process exit code (a container's, for strata run).
type exitError struct{ code int }

func (e exitError) Error() string { return "exit status" }

func exitCode(err error) int {
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

func newRootCmd() *cobra.Command {
	g := &globalFlags{}
	cmd := &cobra.Command{
		Use:           "strata",
		Short:         "Start containers before their images are downloaded",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.PersistentFlags().StringVar(&g.root, "root", "/var/lib/strata", "node state directory")
	cmd.PersistentFlags().StringVar(&g.cacheSize, "cache-size", "2GiB", "bound on the node's content cache (e.g. 16MiB, 2GiB)")
	cmd.PersistentFlags().DurationVar(&g.fetchTimeout, "fetch-timeout", 30*time.Second, "bound on a read that waits for the registry; then the read fails with EIO")
	cmd.PersistentFlags().StringVar(&g.profiles, "startup-profiles", node.ProfilesAuto, "start-up profiles: auto (prefetch an image's profile when a container starts; record and store one where the registry has none), use (prefetch only), off")
	cmd.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	cmd.AddCommand(newRegistryCmd(g), newDaemonCmd(g), newPullCmd(g), newMountCmd(g), newUmountCmd(g),
		newDFCmd(g), newImagesCmd(g), newRmiCmd(g), newRunCmd(g), newPsCmd(g), newLogsCmd(g), newStopCmd(g), newRmCmd(g), newSnapshotterCmd(g))
	return cmd
}

func (g *globalFlags) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}
