package integration

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/strata-oci/strata/internal/s3test"
)

// startRegistryS3 runs `strata registry serve` with its store in a new
// bucket of a SeaweedFS server (under the prefix "strata"), credentials
// from the AWS environment variables (set for the test: not in parallel
// tests).
func startRegistryS3(t *testing.T, extra ...string) (reg *registryProc, srv *s3test.Server, bucket string) {
	t.Helper()
	srv = s3test.Start(t)
	srv.SetEnv(t)
	bucket = srv.Bucket(t)
	args := append([]string{"--storage", "s3://" + bucket + "/strata", "--s3-endpoint", srv.Endpoint, "--s3-path-style"}, extra...)
	return startRegistry(t, args...), srv, bucket
}

// TestS3PushAndRun pushes the Debian+python3 image with skopeo to a
// registry on S3 that redirects blob GETs to the object store, runs it
// lazily with strata run, and copies it back: the blobs are in the bucket,
// and the registry's local directory holds only the expansion state.
func TestS3PushAndRun(t *testing.T) {
	requireRun(t)
	s3test.Require(t)
	layout, _, size := debianPython(t)
	reg, srv, bucket := startRegistryS3(t, "--s3-redirect")
	ref := reg.Addr + "/debian/python:latest"

	start := time.Now()
	pushLayout(t, layout, "latest", ref)
	t.Logf("skopeo push of the python image (%.1f MB layer) to the registry on S3: %v", float64(size)/1e6, time.Since(start).Round(time.Millisecond))

	// The blobs are objects; nothing of them is kept locally.
	objects := map[string]int64{}
	p := s3.NewListObjectsV2Paginator(srv.Client(), &s3.ListObjectsV2Input{Bucket: aws.String(bucket), Prefix: aws.String("strata/")})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range page.Contents {
			objects[aws.ToString(o.Key)] = aws.ToInt64(o.Size)
		}
	}
	var layer bool
	for k, n := range objects {
		if strings.HasPrefix(k, "strata/blobs/sha256/") && n == size {
			layer = true
		}
		if strings.HasPrefix(k, "strata/uploads/") {
			t.Errorf("upload session left in the bucket: %s", k)
		}
	}
	if !layer {
		t.Errorf("no object of the layer's size under strata/blobs/: %v", objects)
	}
	filepath.WalkDir(reg.Root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			rel, _ := filepath.Rel(reg.Root, p)
			// The expansion state, and an expansion in progress.
			if !strings.HasPrefix(rel, "expand/") && !strings.HasPrefix(rel, "tmp/") && rel != "lock" {
				t.Errorf("local file %s in the registry's directory", rel)
			}
		}
		return nil
	})

	root := nodeRoot(t)
	start = time.Now()
	out, errOut, code := strataCode(t, root, "run", "--rm", "--plain-http", ref, "python3", "-c", `print("hello")`)
	if code != 0 || out != "hello\n" {
		t.Fatalf("run: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "lazy") {
		t.Errorf("stderr does not say the lazy mode was used: %s", errOut)
	}
	t.Logf("first lazy strata run from the registry on S3 (expansion included): %v", time.Since(start).Round(time.Millisecond))

	dst := filepath.Join(t.TempDir(), "pulled")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start = time.Now()
	run(t, ctx, "skopeo", "copy", "-q", "--src-tls-verify=false", "docker://"+ref, "oci:"+dst+":latest")
	t.Logf("skopeo pull through the redirect: %v", time.Since(start).Round(time.Millisecond))
	var blobs int
	filepath.WalkDir(filepath.Join(layout, "blobs"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		a, _ := os.ReadFile(p)
		b, err := os.ReadFile(filepath.Join(dst, "blobs", "sha256", d.Name()))
		if err != nil || string(a) != string(b) {
			t.Errorf("blob %s differs after the round trip (%v)", d.Name(), err)
		}
		blobs++
		return nil
	})
	if blobs == 0 {
		t.Fatal("no blobs compared")
	}

	// Garbage collection of a bucket is refused, saying so.
	out, err := runErr(ctx, strataBin, "registry", "gc", "--root", t.TempDir(), "--storage", "s3://"+bucket+"/strata", "--s3-endpoint", srv.Endpoint, "--s3-path-style")
	if err == nil || !strings.Contains(out, "garbage collection of a registry on S3 is not supported yet") {
		t.Errorf("registry gc on S3: %v\n%s", err, out)
	}
}
