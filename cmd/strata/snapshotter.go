package main

import (
	"path/filepath"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/strata-oci/strata/internal/criauth"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/snapshotter"
)

func newSnapshotterCmd(g *globalFlags) *cobra.Command {
	var address, criSocket, criBackend string
	cmd := &cobra.Command{
		Use:   "snapshotter --address SOCKET",
		Short: "Serve containerd's snapshots API (proxy plugin) with layers as lazy layer mounts",
		Long: `Serve containerd's snapshots API on a unix socket, for containerd's
proxy_plugins. Layer snapshots containerd prepares with the CRI labels are
mounted from the registry's expansion instead of downloaded; everything else
is an ordinary overlay snapshot. State lives in ROOT/snapshotter.

With --cri-image-service SOCKET it also serves the CRI image service there,
forwarding every call to containerd's (--cri-backend): pointed at it (the
kubelet's --image-service-endpoint), it keeps the credentials of each pull
(Kubernetes image pull secrets), in memory, for the layer mounts of that
image.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			size, err := parseSize(g.cacheSize)
			if err != nil {
				return err
			}
			log := g.logger()
			ctx := cmd.Context()
			dir := filepath.Join(g.root, "snapshotter")
			creds := remote.DockerCredentials(log)
			var keys *criauth.Keychain
			if criSocket != "" {
				keys = criauth.NewKeychain()
				creds = keys.Credentials(creds)
			}
			m, err := node.Open(ctx, node.Options{
				Root: filepath.Join(dir, "node"), CacheSize: size, Logger: log, FetchTimeout: g.fetchTimeout,
				Remote: remote.New(remote.Options{
					Hosts:       snapshotter.Hosts(g.hostsDir),
					Credentials: creds, Logger: log,
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
			if keys == nil {
				return snapshotter.Serve(ctx, sn, address)
			}
			eg, ctx := errgroup.WithContext(ctx)
			eg.Go(func() error { return snapshotter.Serve(ctx, sn, address) })
			eg.Go(func() error { return criauth.Serve(ctx, criSocket, criBackend, keys, log) })
			return eg.Wait()
		},
	}
	cmd.Flags().StringVar(&address, "address", "/run/strata/snapshotter.sock", "unix socket containerd connects to")
	cmd.Flags().StringVar(&criSocket, "cri-image-service", "", "also serve the CRI image service on this unix socket, forwarding to --cri-backend and keeping each pull's credentials (Kubernetes pull secrets) for its layer mounts; point the kubelet's --image-service-endpoint at it (empty: none)")
	cmd.Flags().StringVar(&criBackend, "cri-backend", "/run/containerd/containerd.sock", "containerd's CRI socket, which --cri-image-service forwards to")
	return cmd
}
