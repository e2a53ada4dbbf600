package main

import (
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/snapshotter"
)

func newSnapshotterCmd(g *globalFlags) *cobra.Command {
	var address string
	cmd := &cobra.Command{
		Use:   "snapshotter --address SOCKET",
		Short: "Serve containerd's snapshots API (proxy plugin) with layers as lazy layer mounts",
		Long: `Serve containerd's snapshots API on a unix socket, for containerd's
proxy_plugins. Layer snapshots containerd prepares with the CRI labels are
mounted from the registry's expansion instead of downloaded; everything else
is an ordinary overlay snapshot. State lives in ROOT/snapshotter.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			size, err := parseSize(g.cacheSize)
			if err != nil {
				return err
			}
			log := g.logger()
			ctx := cmd.Context()
			dir := filepath.Join(g.root, "snapshotter")
			m, err := node.Open(ctx, node.Options{
				Root: filepath.Join(dir, "node"), CacheSize: size, Logger: log, FetchTimeout: g.fetchTimeout,
				Remote: remote.New(remote.Options{
					Hosts:       snapshotter.Hosts(g.hostsDir),
					Credentials: remote.DockerCredentials(log), Logger: log,
				}),
			})
			if err != nil {
				return err
			}
			defer m.Close(ctx)
			if g.metricsAddr != "" {
				stop, err := m.ServeMetrics(g.metricsAddr)
				if err != nil {
					return err
				}
				defer stop()
			}
			sn, err := snapshotter.Open(ctx, snapshotter.Options{Root: dir, Layers: m, Logger: log})
			if err != nil {
				return err
			}
			defer sn.Close()
			log.Info("snapshotter listening", "address", address, "root", dir)
			return snapshotter.Serve(ctx, sn, address)
		},
	}
	cmd.Flags().StringVar(&address, "address", "/run/strata/snapshotter.sock", "unix socket containerd connects to")
	return cmd
}
