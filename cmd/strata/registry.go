package main

import (
	"fmt"
	"net"
	"net/http"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/store"
)

func newRegistryCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "registry", Short: "Run the strata registry"}
	var addr, root, cert, key string
	var workers int
	var htpasswd string
	var anonPull bool
	serve := &cobra.Command{
		Use:   "serve",
		Short: "Serve an OCI registry with layer mounts from a directory (foreground)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := g.logger()
			st, err := store.Open(root)
			if err != nil {
				return err
			}
			metrics := registry.NewMetrics()
			cfg := registry.ServeConfig{Store: st, Logger: log, Metrics: metrics, TLSCert: cert, TLSKey: key, AnonymousPull: anonPull}
			if htpasswd != "" {
				if cfg.Users, err = registry.LoadHtpasswd(htpasswd); err != nil {
					return err
				}
			}
			exp, err := expand.New(st, expand.Options{
				Logger:  log,
				Workers: workers,
				OnDone:  func(outcome string) { metrics.Expansion.WithLabelValues(outcome).Inc() },
			})
			if err != nil {
				return err
			}
			go exp.Run(cmd.Context())
			reg := registry.New(st, registry.Options{Logger: log, Metrics: metrics, OnManifest: exp.OnManifest})
			reg.Extension(api.Extension, exp.Handler(func(r *http.Request) (string, string) {
				return registry.RepoFromContext(r.Context())
			}))
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			scheme := "http"
			if cert != "" {
				scheme = "https"
			}
			log.Info("registry listening", "url", fmt.Sprintf("%s://%s", scheme, ln.Addr()), "root", root)
			return registry.Serve(cmd.Context(), ln, registry.Handler(reg, cfg), cfg)
		},
	}
	serve.Flags().StringVar(&addr, "addr", "127.0.0.1:5000", "listen address HOST:PORT")
	serve.Flags().StringVar(&root, "root", "/var/lib/strata/registry", "registry storage directory")
	serve.Flags().StringVar(&htpasswd, "htpasswd", "", "require basic auth with the bcrypt accounts of this htpasswd file")
	serve.Flags().BoolVar(&anonPull, "anonymous-pull", false, "with --htpasswd: let anyone pull, only accounts push and delete")
	serve.Flags().IntVar(&workers, "expand-workers", 2, "layers expanded concurrently")
	serve.Flags().StringVar(&cert, "tls-cert", "", "TLS certificate file (enables HTTPS)")
	serve.Flags().StringVar(&key, "tls-key", "", "TLS key file")
	cmd.AddCommand(serve)
	return cmd
}
