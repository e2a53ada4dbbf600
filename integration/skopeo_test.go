package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestSkopeoRoundTrip pushes an image to `strata registry serve` with
// skopeo and copies it back: a standard client must find the registry
// complete, and the copy must be byte-identical.
func TestSkopeoRoundTrip(t *testing.T) {
	testenv.RequireTool(t, "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	reg := startRegistry(t)

	src := filepath.Join(t.TempDir(), "src")
	big := bytes.Repeat([]byte("strata "), 300000) // a 2 MiB file, pushed in chunks by skopeo
	tarStream, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "etc/hello", Content: []byte("hello from strata\n")},
		{Name: "data/", Type: tar.TypeDir},
		{Name: "data/big", Content: big},
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/sh", Type: tar.TypeSymlink, Linkname: "busybox"},
	})
	if err != nil {
		t.Fatal(err)
	}
	md, err := ocilayout.Write(src, "v1", ocilayout.Image{
		Layers: []ocilayout.Layer{ocilayout.GzipLayer(tarStream)},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/sh"}, Env: []string{"PATH=/bin"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ref := "docker://" + reg.Addr + "/demo/hello:v1"
	run(t, ctx, "skopeo", "copy", "--dest-tls-verify=false", "oci:"+src+":v1", ref)

	out := run(t, ctx, "skopeo", "inspect", "--tls-verify=false", "--raw", ref)
	var m ocispec.Manifest
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("inspect --raw: %v\n%s", err, out)
	}
	if len(m.Layers) != 1 {
		t.Fatalf("manifest has %d layers, want 1", len(m.Layers))
	}
	digestOut := run(t, ctx, "skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", ref)
	if got := string(bytes.TrimSpace([]byte(digestOut))); got != md.String() {
		t.Errorf("registry reports digest %s, pushed %s", got, md)
	}
	tags := run(t, ctx, "skopeo", "list-tags", "--tls-verify=false", "docker://"+reg.Addr+"/demo/hello")
	if !bytes.Contains([]byte(tags), []byte(`"v1"`)) {
		t.Errorf("list-tags lacks v1:\n%s", tags)
	}

	dst := filepath.Join(t.TempDir(), "dst")
	run(t, ctx, "skopeo", "copy", "--src-tls-verify=false", ref, "oci:"+dst+":v1")
	for _, l := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		a, err := os.ReadFile(filepath.Join(src, "blobs", "sha256", l.Digest.Encoded()))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dst, "blobs", "sha256", l.Digest.Encoded()))
		if err != nil {
			t.Fatalf("blob %s missing after copy back: %v", l.Digest, err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("blob %s differs after the round trip", l.Digest)
		}
	}

	// Copy between repositories of the same registry: skopeo mounts blobs.
	run(t, ctx, "skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", ref, "docker://"+reg.Addr+"/other/copy:latest")
	run(t, ctx, "skopeo", "inspect", "--tls-verify=false", "docker://"+reg.Addr+"/other/copy:latest")
	// Delete by digest, then the tag is gone too.
	run(t, ctx, "skopeo", "delete", "--tls-verify=false", "docker://"+reg.Addr+"/other/copy@"+md.String())
	if _, err := runErr(ctx, "skopeo", "inspect", "--tls-verify=false", "docker://"+reg.Addr+"/other/copy:latest"); err == nil {
		t.Errorf("inspect after delete succeeded")
	}
}
