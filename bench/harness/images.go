package harness

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testimage"
)

// image is one benchmark image, built locally and pushed to both registries.
type image struct {
	Name        string
	Description string
	Args        []string // the workload
	Want        string   // its first output line
	Label       string   // a short description of the workload, if any
	// rootfs is the image's tree (a local copy of what the image holds);
	// layout the OCI image layout made from it.
	rootfs     string
	layout     string
	layers     []digest.Digest
	compressed int64
	unpacked   int64
	// profileErr is why recording the image's start-up profile failed.
	profileErr error
	// expandErr is why strata expand on the CNCF registry failed.
	expandErr error
	// readPaths are the files the workload reads at start (measureReads);
	// stargzBytes the size of the image's eStargz conversions, by system.
	readPaths   []string
	stargzBytes map[string]int64
}

// repo is the image's repository in both registries.
func (im *image) repo() string { return "bench/" + im.Name }

// imageSpec says how to make one image.
type imageSpec struct {
	description string
	args        []string
	want        string
	// label describes the workload in tables when args are too long.
	label string
	// tree makes the root filesystem (into a fresh directory under the
	// node disk when the tree is generated, or returns a cached one).
	tree func(ctx context.Context, e *env, dir string) (string, error)
	// layers splits the tree into this many layers (default 1).
	layers int
}

var imageSpecs = map[string]imageSpec{
	"python": {
		description: "Debian bookworm (minbase) + python3, one gzip layer",
		args:        []string{"python3", "-c", `print("hello")`},
		want:        "hello",
		tree: func(ctx context.Context, e *env, dir string) (string, error) {
			return testimage.Debian(ctx, testimage.DefaultCacheDir, "bookworm", "python3")
		},
	},
	"python-layers": {
		description: "the python image split into 24 gzip layers",
		args:        []string{"python3", "-c", `print("hello")`},
		want:        "hello",
		tree: func(ctx context.Context, e *env, dir string) (string, error) {
			return testimage.Debian(ctx, testimage.DefaultCacheDir, "bookworm", "python3")
		},
		layers: 24,
	},
	"gcc": {
		description: "Debian bookworm (minbase) + gcc + libc6-dev, one gzip layer; compiles and runs hello.c",
		label:       "sh -c: write hello.c, gcc -O2 it, run it",
		args:        []string{"sh", "-c", `printf '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n' > /tmp/hello.c && gcc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello`},
		want:        "hello",
		tree: func(ctx context.Context, e *env, dir string) (string, error) {
			return testimage.Debian(ctx, testimage.DefaultCacheDir, "bookworm", "gcc", "libc6-dev")
		},
	},
	"tiny": {
		description: "busybox (static), one gzip layer: the smoke test's image",
		args:        []string{"/bin/busybox", "echo", "hello"},
		want:        "hello",
		tree:        busyboxTree,
	},
}

// busyboxTree is a root filesystem with only a static busybox.
func busyboxTree(ctx context.Context, e *env, dir string) (string, error) {
	src, err := exec.LookPath("busybox")
	if err != nil {
		return "", fmt.Errorf("busybox-static is not installed: %w", err)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), b, 0o755); err != nil {
		return "", err
	}
	if err := os.Symlink("busybox", filepath.Join(dir, "bin", "sh")); err != nil {
		return "", err
	}
	return dir, os.WriteFile(filepath.Join(dir, "etc", "passwd"), []byte("root:x:0:0:root:/:/bin/sh\n"), 0o644)
}

// buildImage makes the tree and the OCI layout of image name from spec.
func (e *env) buildImage(ctx context.Context, name string, spec imageSpec) (*image, error) {
	im := &image{Name: name, Description: spec.description, Args: spec.args, Want: spec.want, Label: spec.label}
	dir := filepath.Join(e.work, "trees", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var err error
	if im.rootfs, err = spec.tree(ctx, e, dir); err != nil {
		return nil, err
	}
	im.layout = filepath.Join(e.work, "images", name)
	n := max(spec.layers, 1)
	parts, err := splitTree(im.rootfs, n)
	if err != nil {
		return nil, err
	}
	var layers []ocilayout.Layer
	for _, part := range parts {
		var buf bytes.Buffer
		if err := tarList(ctx, im.rootfs, part, &buf); err != nil {
			return nil, err
		}
		im.unpacked += int64(buf.Len())
		l := ocilayout.GzipLayer(buf.Bytes())
		im.compressed += int64(len(l.Blob))
		layers = append(layers, l)
	}
	cfg := ocispec.ImageConfig{Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, Cmd: spec.args}
	if _, err := ocilayout.Write(im.layout, "latest", ocilayout.Image{Layers: layers, Config: cfg}); err != nil {
		return nil, err
	}
	for _, l := range layers {
		im.layers = append(im.layers, digest.FromBytes(l.Blob))
	}
	e.logf("image %s: %d layer(s), %d bytes compressed, %d bytes of tar", name, len(layers), im.compressed, im.unpacked)
	return im, nil
}

// splitTree lists the entries of root (relative, "." first, parents before
// children) split into n parts of about equal size; every directory is in
// the first part, so each later part only adds files below existing ones.
func splitTree(root string, n int) ([][]string, error) {
	var dirs, files []string
	var sizes []int64
	var total int64
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel != "." {
			rel = "./" + rel
		}
		if d.IsDir() {
			dirs = append(dirs, rel)
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		files = append(files, rel)
		sizes = append(sizes, info.Size())
		total += info.Size()
		return nil
	})
	if err != nil {
		return nil, err
	}
	if n == 1 {
		return [][]string{append(dirs, files...)}, nil
	}
	parts := make([][]string, n)
	parts[0] = dirs
	var acc int64
	for i, f := range files {
		k := min(int(acc*int64(n)/max(total, 1)), n-1)
		parts[k] = append(parts[k], f)
		acc += sizes[i]
	}
	return parts, nil
}

// tarList writes a tar of the listed entries of dir (no recursion), the way
// testimage.Tar writes a whole tree.
func tarList(ctx context.Context, dir string, entries []string, w *bytes.Buffer) error {
	cmd := exec.CommandContext(ctx, "tar", "--no-recursion", "--numeric-owner", "--xattrs", "--xattrs-include=*",
		"--format=posix", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
		"-C", dir, "-cf", "-", "-T", "-")
	cmd.Stdin = strings.NewReader(strings.Join(entries, "\n") + "\n")
	cmd.Stdout = w
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("tar %s: %w: %s", dir, err, stderr.String())
	}
	return nil
}

// dataTree makes the read benchmark's files: count files of size bytes,
// pseudo-random and about 2:1 compressible (half of every 4 KiB block is
// random, half a repeated pattern), like binaries.
func dataTree(dir string, count int, size int64) ([]string, error) {
	d := filepath.Join(dir, "data")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var names []string
	for i := range count {
		name := filepath.Join(d, fmt.Sprintf("file%d.bin", i))
		f, err := os.Create(name)
		if err != nil {
			return nil, err
		}
		block := make([]byte, 1<<20)
		for off := int64(0); off < size; off += int64(len(block)) {
			for j := 0; j < len(block); j += 4096 {
				for k := j; k < j+2048; k += 8 {
					v := rng.Uint64()
					for b := range 8 {
						block[k+b] = byte(v >> (8 * b))
					}
				}
				copy(block[j+2048:j+4096], bytes.Repeat([]byte("strata-"), 293))
			}
			if _, err := f.Write(block[:min(int64(len(block)), size-off)]); err != nil {
				f.Close()
				return nil, err
			}
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
		names = append(names, filepath.Join("data", filepath.Base(name)))
	}
	return names, nil
}
