package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/internal/store/s3store"
)

// storageFlags choose where a registry keeps its store: the directory of
// --root (the default), or an S3 bucket (--storage s3://…), with --root
// (or --expand-dir) then a local directory for what is kept locally.
type storageFlags struct {
	url, endpoint, region, expandDir string
	pathStyle, redirect              bool
}

// add gives cmd the storage flags (--s3-redirect only if serving).
func (f *storageFlags) add(cmd *cobra.Command, serving bool) {
	fl := cmd.Flags()
	fl.StringVar(&f.url, "storage", "", "keep the registry in an S3-compatible bucket, s3://BUCKET[/PREFIX] (default: the --root directory); credentials from the AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE …)")
	fl.StringVar(&f.endpoint, "s3-endpoint", "", "with --storage s3://: the object store's URL (https://minio.example:9000); default AWS S3")
	fl.StringVar(&f.region, "s3-region", "", "with --storage s3://: the bucket's region (default AWS_REGION, the shared config, else us-east-1)")
	fl.BoolVar(&f.pathStyle, "s3-path-style", false, "with --storage s3://: address the bucket in the URL's path, not its host name (most stores other than AWS)")
	fl.StringVar(&f.expandDir, "expand-dir", "", "with --storage s3://: local directory of the expansion state and temporary files (default --root)")
	if serving {
		fl.BoolVar(&f.redirect, "s3-redirect", false, "with --storage s3://: answer blob GETs with 307 to a presigned URL of the object store, which serves the bytes")
	}
}

// s3 reports whether the store is in a bucket.
func (f *storageFlags) s3() bool { return f.url != "" }

// localDir is the local directory of a store with its --root: the root
// itself, or for a bucket --expand-dir if given.
func (f *storageFlags) localDir(root string) string {
	if f.s3() && f.expandDir != "" {
		return f.expandDir
	}
	return root
}

// check refuses the S3 flags without --storage.
func (f *storageFlags) check(cmd *cobra.Command) error {
	if f.s3() {
		return nil
	}
	for _, name := range []string{"s3-endpoint", "s3-region", "s3-path-style", "s3-redirect", "expand-dir"} {
		if fl := cmd.Flags().Lookup(name); fl != nil && fl.Changed {
			return usageError{cmd, fmt.Errorf("--%s needs --storage s3://BUCKET[/PREFIX]", name)}
		}
	}
	return nil
}

// driver opens the bucket of --storage, checking that it is there.
func (f *storageFlags) driver(ctx context.Context, cmd *cobra.Command) (*s3store.Driver, error) {
	bucket, prefix, err := s3store.ParseURL(f.url)
	if err != nil {
		return nil, usageError{cmd, fmt.Errorf("--storage: %w", err)}
	}
	return s3store.Open(ctx, s3store.Options{Bucket: bucket, Prefix: prefix, Endpoint: f.endpoint, Region: f.region, PathStyle: f.pathStyle})
}

// open opens the store to serve it: the filesystem at root, or the bucket.
func (f *storageFlags) open(ctx context.Context, cmd *cobra.Command, root string) (*store.Store, error) {
	if err := f.check(cmd); err != nil {
		return nil, err
	}
	if !f.s3() {
		return store.Open(root)
	}
	d, err := f.driver(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return store.OpenDriver(d, store.Options{LocalDir: f.localDir(root), Redirect: f.redirect})
}

// where names the storage for the log.
func (f *storageFlags) where(root string) string {
	if f.s3() {
		return f.url
	}
	return root
}
