package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/container"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/nodeapi"
)

func (g *globalFlags) containers() container.Containers {
	return container.Containers{Dir: filepath.Join(g.root, "containers")}
}

func leaseID(id string) string { return "container:" + id }

func newRunCmd(g *globalFlags) *cobra.Command {
	var (
		plain, rm, interactive, tty, detach bool
		env, volumes                        []string
		workdir, user, entrypoint, network  string
		name                                string
	)
	cmd := &cobra.Command{
		Use:   "run [flags] REF [CMD ARG...]",
		Short: "Run a container from an image, starting before the image is downloaded",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) (err error) {
			ctx := cmd.Context()
			if detach && (rm || tty) {
				return fmt.Errorf("-d cannot be combined with --rm or -t")
			}
			cs := g.containers()
			if name != "" {
				if _, err := cs.Get(ctx, name); err == nil {
					return fmt.Errorf("a container named %q exists", name)
				}
			}
			c, err := g.dial(cmd)
			if err != nil {
				return err
			}
			id := container.NewID()
			start := time.Now()
			var lease *node.Lease
			err = withProgress(ctx, c, func() (err error) {
				lease, err = c.Acquire(ctx, nodeapi.AcquireRequest{ID: leaseID(id), Ref: args[0], PlainHTTP: plain})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "strata: %s (%s) ready in %s\n", lease.Ref, modeText(lease.Image), time.Since(start).Round(time.Millisecond))
			cleanup := func() {
				// Clean up even after Ctrl-C cancelled ctx.
				cctx := context.WithoutCancel(ctx)
				cs.Remove(cctx, id, true)
				c.Release(cctx, leaseID(id))
			}
			defer func() {
				if err != nil {
					if _, ok := err.(exitError); !ok {
						cleanup()
					}
				}
			}()
			opts := container.RunOptions{
				Args: args[1:], Env: env, Workdir: workdir, User: user, Tty: tty,
				Volumes: volumes, Network: network, Hostname: id[:12],
			}
			if cmd.Flags().Changed("entrypoint") {
				opts.Entrypoint = []string{}
				if entrypoint != "" {
					opts.Entrypoint = []string{entrypoint}
				}
			}
			if network == "host" {
				opts.ResolvConf, opts.Hosts = "/etc/resolv.conf", "/etc/hosts"
			}
			info := container.Info{ID: id, Name: name, Ref: lease.Ref, Mode: lease.Image.Mode, Created: time.Now().UTC(), Detached: detach}
			rootfs, err := cs.Prepare(info, lease.Lowers)
			if err != nil {
				return err
			}
			spec, err := container.Spec(lease.Image.Config.Config, rootfs, opts)
			if err != nil {
				return err
			}
			if err := cs.WriteSpec(id, spec); err != nil {
				return err
			}
			if detach {
				if err := cs.Start(ctx, id); err != nil {
					return err
				}
				fmt.Println(id)
				return nil
			}
			var in io.Reader
			if interactive {
				in = os.Stdin
			}
			code, err := cs.Run(ctx, id, container.Stdio{In: in, Out: os.Stdout, Err: os.Stderr})
			if err != nil {
				return err
			}
			if rm {
				cleanup()
			}
			if code != 0 {
				return exitError{code}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false)
	f.BoolVar(&plain, "plain-http", false, "reach the registry over plain HTTP")
	f.BoolVar(&rm, "rm", false, "remove the container when it exits")
	f.BoolVarP(&interactive, "interactive", "i", false, "keep standard input open")
	f.BoolVarP(&tty, "tty", "t", false, "allocate a terminal")
	f.BoolVarP(&detach, "detach", "d", false, "run in the background and print the container id")
	f.StringArrayVarP(&env, "env", "e", nil, "set an environment variable (K=V)")
	f.StringArrayVarP(&volumes, "volume", "v", nil, "bind mount SRC:DST[:ro]")
	f.StringVarP(&workdir, "workdir", "w", "", "working directory in the container")
	f.StringVarP(&user, "user", "u", "", "user (name or uid[:gid])")
	f.StringVar(&entrypoint, "entrypoint", "", "override the image's entrypoint")
	f.StringVar(&network, "net", "none", "network: host or none")
	f.StringVar(&name, "name", "", "container name")
	return cmd
}

func newPsCmd(g *globalFlags) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List containers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := g.containers().List(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "CONTAINER ID\tIMAGE\tSTATUS\tMODE\tCREATED\tNAME")
			for _, c := range list {
				if !all && c.Status != "running" && c.Status != "created" {
					continue
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.ID[:12], c.Ref, c.Status, c.Mode, c.Created.Format(time.RFC3339), c.Name)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "show stopped containers too")
	return cmd
}

func newLogsCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "logs CONTAINER",
		Short: "Print the output of a detached container",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cs := g.containers()
			c, err := cs.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			f, err := os.Open(cs.LogPath(c.ID))
			if err != nil {
				return fmt.Errorf("container %s has no log (it ran in the foreground)", args[0])
			}
			defer f.Close()
			_, err = io.Copy(os.Stdout, f)
			return err
		},
	}
}

func newStopCmd(g *globalFlags) *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop CONTAINER...",
		Short: "Stop containers (SIGTERM, then SIGKILL after a timeout)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cs := g.containers()
			for _, a := range args {
				c, err := cs.Get(cmd.Context(), a)
				if err != nil {
					return err
				}
				if err := cs.Stop(cmd.Context(), c.ID, timeout); err != nil {
					return err
				}
				fmt.Println(a)
			}
			return nil
		},
	}
	cmd.Flags().DurationVarP(&timeout, "time", "t", 10*time.Second, "time to wait before SIGKILL")
	return cmd
}

func newRmCmd(g *globalFlags) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm CONTAINER...",
		Short: "Remove containers, their mounts and their writable layer",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cs := g.containers()
			var errs []string
			for _, a := range args {
				c, err := cs.Get(cmd.Context(), a)
				if err != nil {
					errs = append(errs, err.Error())
					continue
				}
				if err := cs.Remove(cmd.Context(), c.ID, force); err != nil {
					errs = append(errs, err.Error())
					continue
				}
				if nc, err := g.dial(cmd); err == nil {
					nc.Release(cmd.Context(), leaseID(c.ID))
				}
				fmt.Println(a)
			}
			if len(errs) > 0 {
				return fmt.Errorf("%s", strings.Join(errs, "; "))
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill and remove running containers")
	return cmd
}
