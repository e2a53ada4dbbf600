package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/gc"
	"github.com/strata-oci/strata/internal/store"
)

// newRegistryGCCmd is `strata registry gc`: one garbage collection of a
// registry root, beside the registry serving it (docs/gc.md).
func newRegistryGCCmd(g *globalFlags) *cobra.Command {
	var root, config string
	var opts gc.Options
	var storage storageFlags
	cmd := &cobra.Command{
		Use:   "gc",
		Short: "Remove what no image of a registry uses any more (safe while it serves)",
		Long: `Remove what no image of the registry at --root uses any more: blobs,
manifests whose subject is gone, expansions of layers no repository holds,
start-up profiles and packs of deleted images, stale upload sessions and
temporary files. The registry may keep serving (pushes included): nothing
younger than --grace is removed. Prints what was freed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := g.logger()
			if err := storage.check(cmd); err != nil {
				return err
			}
			if storage.s3() {
				// Checked, so that a wrong bucket is said as such.
				if _, err := storage.driver(cmd.Context(), cmd); err != nil {
					return err
				}
				return fmt.Errorf("%s: garbage collection of a registry on S3 is not supported yet (docs/deployment.md)", storage.url)
			}
			st, err := store.OpenShared(root)
			if err != nil {
				return err
			}
			unlock, err := store.LockGC(root)
			if err != nil {
				return err
			}
			defer unlock()
			ex, err := expand.New(st, expand.Options{Logger: log})
			if err != nil {
				return err
			}
			opts.Logger = log
			rep, err := gc.Collect(cmd.Context(), st, ex, opts)
			if rep != nil {
				fmt.Fprintln(cmd.OutOrStdout(), gcReport(rep))
			}
			return err
		},
	}
	cmd.Flags().StringVar(&root, "root", "/var/lib/strata/registry", "registry storage directory")
	storage.add(cmd, false)
	cmd.Flags().BoolVar(&opts.DryRun, "dry-run", false, "report what would be removed, remove nothing")
	cmd.Flags().DurationVar(&opts.Grace, "grace", gc.DefaultGrace, "never remove anything modified more recently than this (pushes in progress)")
	cmd.Flags().DurationVar(&opts.UploadMaxAge, "upload-max-age", gc.DefaultUploadMaxAge, "remove upload sessions not written to for this long")
	addConfigFlag(cmd, &config) // the registry's: its root
	cmd.Flags().BoolVar(&opts.DeleteUntagged, "delete-untagged", false, "also remove manifests no tag reaches (images pushed by digest only)")
	return cmd
}

// gcReport says in one line what a collection freed (or would free).
func gcReport(r *gc.Report) string {
	verb := "removed"
	if r.DryRun {
		verb = "would remove"
	}
	return fmt.Sprintf("%s %d blobs (%s), %d manifests, %d links, %d expansion records, %d compressed indexes (%s), %d profiles, %d upload sessions, %d temporary files (%s), %d empty repositories; %d repositories looked at, %d unused blobs kept as younger than the grace period; took %s",
		verb, r.Blobs, human(r.BlobBytes), r.Manifests, r.Links, r.Expansions, r.Indexes, human(r.IndexBytes), r.Profiles, r.Uploads, r.TempFiles, human(r.TempBytes), r.EmptyRepos,
		r.Repositories, r.Kept, r.Elapsed.Round(time.Millisecond))
}
