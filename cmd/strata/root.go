package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/container"
	"github.com/strata-oci/strata/internal/node"
)

// globalFlags holds strata's shared flags: --log-level, which every command
// takes, and the node's flags, which only the node's commands take (see
// addNodeFlags). The registry's commands have flags of their own.
type globalFlags struct {
	root         string
	cacheSize    string
	logLevel     string
	fetchTimeout time.Duration
	profiles     string
	metricsAddr  string
	hostsDir     string
	config       string
}

// addNodeFlags gives a node command the node's flags. They are each node
// command's own flags rather than the root's persistent ones, so the
// registry's commands neither list nor take them; cobra hands a node command
// every flag of its command line, so `strata --root DIR run …` (how scripts
// and the daemon's own start spell it) works as `strata run --root DIR …` does.
func (g *globalFlags) addNodeFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&g.root, "root", "/var/lib/strata", "node state directory")
	f.StringVar(&g.cacheSize, "cache-size", "2GiB", "bound on the node's content cache (e.g. 16MiB, 2GiB)")
	f.DurationVar(&g.fetchTimeout, "fetch-timeout", 30*time.Second, "bound on a read that waits for the registry; then the read fails with EIO")
	f.StringVar(&g.profiles, "startup-profiles", node.ProfilesAuto, "start-up profiles: auto (prefetch an image's profile when a container starts; record and store one where the registry has none), use (prefetch only), off")
	f.StringVar(&g.metricsAddr, "metrics-addr", "", "serve the node's Prometheus metrics at http://HOST:PORT/metrics (the daemon, or the snapshotter; empty: none)")
	f.StringVar(&g.hostsDir, "hosts-dir", "/etc/containerd/certs.d", "containerd's registry host configuration directory (HOST/hosts.toml: mirrors, TLS, plain HTTP); empty: none")
	addConfigFlag(cmd, &g.config)
}

// Exit statuses. strata run follows docker run: 125 when strata fails
// (a usage error too), 126 when the container's command cannot be
// executed, 127 when it is not found, else the command's own status.
const (
	exitFailure    = 1
	exitUsage      = 2
	exitRunFailure = 125
	exitCannotExec = 126
	exitNotFound   = 127
)

// exitError carries a process exit code (a container's, for strata run).
type exitError struct{ code int }

func (e exitError) Error() string { return "exit status" }

// usageError is a command line cmd cannot act on: an unknown command or
// flag, or the wrong arguments. It reads as one line naming the command.
type usageError struct {
	cmd *cobra.Command
	err error
}

func (e usageError) Error() string { return e.cmd.CommandPath() + ": " + e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// seeHelp makes err a usageError of cmd that points at cmd's help.
func seeHelp(cmd *cobra.Command, err error) error {
	return usageError{cmd, fmt.Errorf("%w (see '%s --help')", err, cmd.CommandPath())}
}

// exitStatus is the process exit status for err, returned by cmd.
func exitStatus(cmd *cobra.Command, err error) int {
	var ee exitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	case !isRun(cmd):
		if errors.As(err, new(usageError)) {
			return exitUsage
		}
		return exitFailure
	case errors.Is(err, container.ErrCommandNotFound):
		return exitNotFound
	case errors.Is(err, container.ErrCommandNotExecutable):
		return exitCannotExec
	default:
		return exitRunFailure
	}
}

func isRun(cmd *cobra.Command) bool {
	return cmd != nil && cmd.Name() == "run" && cmd.Parent() == cmd.Root()
}

func newRootCmd() *cobra.Command {
	g := &globalFlags{}
	cmd := &cobra.Command{
		Use:   "strata",
		Short: "Start containers before their images are downloaded",
		Long: `Start containers before their images are downloaded.

The node's commands take the node's flags (--root, --cache-size,
--fetch-timeout, --startup-profiles, --metrics-addr, --hosts-dir) before or after the
command's name; the registry's commands take their own. See
'strata COMMAND --help'.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		// Flags from --config, once the command line is parsed.
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if err := loadConfig(cmd); err != nil {
				return usageError{cmd, err}
			}
			return nil
		},
	}
	cmd.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	cmd.AddGroup(&cobra.Group{ID: "node", Title: "Node commands:"}, &cobra.Group{ID: "registry", Title: "Registry commands:"})
	for _, c := range []*cobra.Command{newRunCmd(g), newPullCmd(g), newMountCmd(g), newUmountCmd(g), newPsCmd(g), newLogsCmd(g),
		newStopCmd(g), newRmCmd(g), newImagesCmd(g), newRmiCmd(g), newGCCmd(g), newDFCmd(g), newSnapshotterCmd(g), newDaemonCmd(g)} {
		g.addNodeFlags(c)
		c.GroupID = "node"
		cmd.AddCommand(c)
	}
	for _, c := range []*cobra.Command{newRegistryCmd(g), newExpandCmd(g)} {
		c.GroupID = "registry"
		cmd.AddCommand(c)
	}
	cmd.SetFlagErrorFunc(seeHelp)
	cmd.SetHelpCommand(newHelpCmd())
	cmd.InitDefaultCompletionCmd() // now, so that strictUsage reaches it too
	strictUsage(cmd)
	return cmd
}

// strictUsage makes every usage error of cmd's tree a usageError: wrong
// arguments, and an unknown command of a command group, which cobra would
// answer with the group's help and success.
func strictUsage(cmd *cobra.Command) {
	if cmd.HasSubCommands() && cmd.Run == nil && cmd.RunE == nil {
		cmd.Args = knownCommand
		cmd.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	} else if args := cmd.Args; args != nil {
		cmd.Args = func(cmd *cobra.Command, a []string) error {
			if err := args(cmd, a); err != nil {
				return seeHelp(cmd, err)
			}
			return nil
		}
	}
	for _, c := range cmd.Commands() {
		strictUsage(c)
	}
}

// knownCommand is the argument check of a command group: a group run with
// arguments was given a command it does not have.
func knownCommand(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	var names []string
	for _, c := range cmd.Commands() {
		if c.IsAvailableCommand() {
			names = append(names, c.Name())
		}
	}
	return usageError{cmd, fmt.Errorf("unknown command %q (commands: %s)", args[0], strings.Join(names, ", "))}
}

// newHelpCmd is `strata help [COMMAND…]`, which fails on a command strata
// does not have, as the command itself would.
func newHelpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "help [command]",
		Short: "Help about any command",
		RunE: func(cmd *cobra.Command, args []string) error {
			target, rest, err := cmd.Root().Find(args)
			if err != nil {
				return usageError{cmd, err}
			}
			if target.HasSubCommands() {
				if err := knownCommand(target, rest); err != nil {
					return err
				}
			}
			return target.Help()
		},
	}
}

func (g *globalFlags) logger() *slog.Logger {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		lvl = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}
