package main

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestStorageFlags: the S3 flags need --storage, a storage URL is
// s3://BUCKET[/PREFIX], and a bucket that cannot be reached stops serve
// and gc with one sentence before anything is served or collected.
func TestStorageFlags(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "x")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "y")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	unreachable := []string{"--storage", "s3://bucket/prefix", "--s3-endpoint", "http://127.0.0.1:1", "--s3-path-style"}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"redirect without storage", []string{"registry", "serve", "--s3-redirect"}, 2, "--s3-redirect needs --storage s3://BUCKET[/PREFIX]"},
		{"endpoint without storage", []string{"registry", "gc", "--s3-endpoint", "http://x"}, 2, "--s3-endpoint needs --storage"},
		{"expand-dir without storage", []string{"registry", "serve", "--expand-dir", "/tmp/x"}, 2, "--expand-dir needs --storage"},
		{"not an s3 URL", []string{"registry", "serve", "--storage", "/srv/registry"}, 2, `--storage: storage "/srv/registry": want s3://BUCKET[/PREFIX]`},
		{"serve, unreachable", append([]string{"registry", "serve"}, unreachable...), 1, "s3://bucket at http://127.0.0.1:1: cannot reach the object store"},
		{"gc, unreachable", append([]string{"registry", "gc"}, unreachable...), 1, "s3://bucket at http://127.0.0.1:1: cannot reach the object store"},
		{"gc, config file", []string{"registry", "gc", "--config", writeConfig(t, "[registry]\nstorage = \"s3://bucket\"\ns3-endpoint = \"http://127.0.0.1:1\"\ns3-redirect = true\n")}, 1, "cannot reach the object store"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string{}, tc.args[:2]...), "--root", t.TempDir())
			if tc.args[1] == "serve" {
				args = append(args, "--addr", "127.0.0.1:0")
			}
			args = append(args, tc.args[2:]...)
			var stderr strings.Builder
			// The bucket is checked before anything is served: should
			// serve get further, it stops with the context.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			code := execute(ctx, newRootCmd(), args, &stderr)
			if code != tc.code || !strings.Contains(stderr.String(), tc.want) || strings.Count(stderr.String(), "\n") != 1 {
				t.Errorf("exit status %d, stderr %q; want %d and one line naming %q", code, stderr.String(), tc.code, tc.want)
			}
		})
	}
}
