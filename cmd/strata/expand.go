package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/publish"
	"github.com/strata-oci/strata/internal/remote"
)

func newExpandCmd(g *globalFlags) *cobra.Command {
	var plain, profile bool
	var plats []string
	var tmp, hostsDir string
	cmd := &cobra.Command{
		Use:   "expand [--plain-http] [--platform OS/ARCH[/VARIANT]] REF [--profile -- CMD [ARG…]]",
		Short: "Expand an image's layers and push the expansion to its registry as referrers, for lazy starts from any registry",
		Long: `Expand an image's layers and push the expansion to its registry.

strata expand reads the image REF names (a manifest, or every platform of
an index unless --platform chooses), expands each layer locally exactly as
strata's registry does, and pushes each layer's index and data blobs and,
per image manifest, an expansion artifact whose subject is the manifest to
the same repository: through the Referrers API, or, where the registry
lacks it, the referrers tag (sha256-<hex>). A node then starts the image
lazily from that registry. Layers already expanded there are not pushed
again. Credentials come from the Docker config (~/.docker/config.json).

With --profile, strata expand then runs the image once on a throwaway
node (strata run --rm, as root, with runc) with CMD as its command, and
the node stores what the start read as the image's start-up profile, a
profile artifact referring to the manifest: later starts anywhere fetch
it ahead of their reads.`,
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case len(args) == 0:
				return fmt.Errorf("expand needs an image reference")
			case profile && len(args) == 1:
				return fmt.Errorf("--profile needs the command to record after --")
			case !profile && len(args) > 1:
				return fmt.Errorf("expand takes one image reference (a command only with --profile)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			log := g.logger()
			ref, err := remote.ParseReference(args[0])
			if err != nil {
				return usageError{cmd, err}
			}
			var want []ocispec.Platform
			for _, s := range plats {
				for _, s := range strings.Split(s, ",") {
					p, err := platforms.Parse(s)
					if err != nil {
						return usageError{cmd, fmt.Errorf("--platform %q: %w", s, err)}
					}
					want = append(want, p)
				}
			}
			hosts := &remote.Hosts{Dir: hostsDir}
			if plain {
				hosts.AllowPlainHTTP(ref.Registry)
			}
			repo, err := publish.Open(ref.Repository, publish.Options{Hosts: hosts, Credentials: remote.DockerCredentials(log)})
			if err != nil {
				return err
			}
			reference := ref.Tag
			if ref.Digest != "" {
				reference = ref.Digest.String()
			}
			p := newExpandProgress(isTerminal(os.Stderr))
			sum, err := publish.Expand(ctx, repo, reference, publish.ExpandOptions{Platforms: want, TempDir: tmp, Progress: p.event, Logger: log})
			p.finish()
			if err != nil {
				return err
			}
			via := "the Referrers API"
			if sum.ReferrersTag {
				via = "the referrers tag"
			}
			fmt.Printf("%s: expanded %d layers (pushed %s of indexes, %s of data), %d already expanded, %d cannot be expanded; %d manifests, %d expansion artifacts pushed; referrers through %s\n",
				ref, sum.Expanded, human(sum.IndexBytes), human(sum.DataBytes), sum.Already, sum.Invalid, sum.Manifests, sum.Artifacts, via)
			if !profile {
				return nil
			}
			return recordProfile(cmd, ref, plain, hostsDir, args[1:])
		},
	}
	cmd.Flags().BoolVar(&profile, "profile", false, "then run the image once with the command after -- and store its start-up profile")
	cmd.Flags().BoolVar(&plain, "plain-http", false, "reach the registry over plain HTTP")
	cmd.Flags().StringVar(&hostsDir, "hosts-dir", "/etc/containerd/certs.d", "containerd's registry host configuration directory (HOST/hosts.toml): the registry's server, TLS settings and plain HTTP; pushes go to the first host with the push capability")
	cmd.Flags().StringSliceVar(&plats, "platform", nil, "expand only these platforms of an index (os/arch[/variant]; repeatable or comma-separated; default all)")
	cmd.Flags().StringVar(&tmp, "tmp", "", "directory for the expansions while they are pushed (default $TMPDIR)")
	return cmd
}

// expandProgress shows what strata expand does: a line redrawn in place on
// a terminal, else one line per finished step.
type expandProgress struct {
	tty   bool
	drawn bool
}

func newExpandProgress(tty bool) *expandProgress { return &expandProgress{tty: tty} }

func (p *expandProgress) event(e publish.Event) {
	layer := short(e.Layer.String())
	if p.tty {
		line := fmt.Sprintf("%s %s", layer, e.Step)
		if e.Total > 0 {
			line += fmt.Sprintf(" %s %s / %s", bar(e.Done, e.Total, 30), human(e.Done), human(e.Total))
		}
		fmt.Fprintf(os.Stderr, "\r\033[K%s", line)
		p.drawn = true
		if e.Step == publish.StepPushed || e.Step == publish.StepAlready || e.Step == publish.StepInvalid {
			fmt.Fprintln(os.Stderr)
			p.drawn = false
		}
		if e.Step == publish.StepInvalid {
			fmt.Fprintf(os.Stderr, "  %v\n", e.Err)
		}
		return
	}
	switch e.Step {
	case publish.StepAlready:
		fmt.Fprintf(os.Stderr, "layer %s: already expanded\n", layer)
	case publish.StepPushed:
		fmt.Fprintf(os.Stderr, "layer %s: expanded and pushed (%s)\n", layer, human(e.Total))
	case publish.StepInvalid:
		fmt.Fprintf(os.Stderr, "layer %s: cannot be expanded: %v\n", layer, e.Err)
	}
}

func (p *expandProgress) finish() {
	if p.drawn {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
}

// recordProfile starts ref once on a throwaway node with args as its
// command, so that the node records what the start reads and stores it as
// the image's start-up profile, and checks that the registry has it.
func recordProfile(cmd *cobra.Command, ref remote.Reference, plain bool, hostsDir string, args []string) error {
	ctx := cmd.Context()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	root, err := os.MkdirTemp("", "strata-expand-node-")
	if err != nil {
		return err
	}
	runArgs := []string{"--root", root, "--startup-profiles", "auto", "--hosts-dir", hostsDir, "run", "--rm"}
	if plain {
		runArgs = append(runArgs, "--plain-http")
	}
	run := exec.CommandContext(ctx, self, append(append(runArgs, ref.String()), args...)...)
	run.Stdin, run.Stdout, run.Stderr = nil, os.Stderr, os.Stderr
	runErr := run.Run()
	// The node stores the profile when the container's lease ends, and at
	// the latest when it stops: stop it.
	stopped := stopNode(root, 30*time.Second)
	if stopped {
		os.RemoveAll(root)
	} else {
		fmt.Fprintf(os.Stderr, "strata expand: the throwaway node at %s did not stop; left in place\n", root)
	}
	if runErr != nil {
		return fmt.Errorf("recording the start-up profile: strata run %s: %w", ref, runErr)
	}
	hosts := &remote.Hosts{Dir: hostsDir}
	if plain {
		hosts.AllowPlainHTTP(ref.Registry)
	}
	c := remote.New(remote.Options{Hosts: hosts, Credentials: remote.DockerCredentials(nil)})
	img, err := c.Resolve(ctx, ref)
	if err != nil {
		return err
	}
	p, err := c.ProfileReferrer(ctx, ref.Repository, img.Digest)
	if errors.Is(err, remote.ErrNotFound) {
		p, err = c.Profile(ctx, ref.Repository, img.Digest) // strata's own registry
	}
	if err != nil {
		return fmt.Errorf("the start-up profile of %s was not stored (the node's log says why; is push allowed?): %w", ref, err)
	}
	frames := 0
	for _, l := range p.Layers {
		frames += len(l.Frames)
	}
	fmt.Printf("%s: start-up profile stored: %d frames in %d layers\n", ref, frames, len(p.Layers))
	return nil
}

// stopNode stops the node daemon of root, if it runs, and waits for it to
// exit; false when it did not within d.
func stopNode(root string, d time.Duration) bool {
	b, err := os.ReadFile(filepath.Join(root, "daemon.pid"))
	if err != nil {
		return true
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return true
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return true
	}
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if syscall.Kill(pid, 0) != nil {
			return true
		}
	}
	return false
}
