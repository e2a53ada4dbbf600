package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// convert writes the image tagged tag in the OCI layout src as an eStargz
// image into the new OCI layout dst: every layer rebuilt with
// estargz.Build (gzip, stargz's default chunk size and compression level),
// the layer descriptors annotated with the TOC digest and uncompressed
// size that stargz's snapshotter verifies, and the config's diff IDs
// updated. With a prioritized list (paths in the image, in the order the
// workload reads them), each layer puts those of its files first, followed
// by a prefetch landmark, which is what stargz's optimizer
// (`ctr-remote image optimize`) produces from the files it saw the
// workload open; without one, each layer gets a no-prefetch landmark, as
// `ctr-remote image convert --estargz` makes.
func convert(ctx context.Context, src, dst, tag, prioritizedFile string) error {
	var prioritized []string
	if prioritizedFile != "" {
		var err error
		if prioritized, err = readLines(prioritizedFile); err != nil {
			return err
		}
		if len(prioritized) == 0 {
			return fmt.Errorf("%s lists no file", prioritizedFile)
		}
	}
	var mf ocispec.Manifest
	if err := readJSON(src, manifestOf(src, tag), &mf); err != nil {
		return err
	}
	var cfg ocispec.Image
	if err := readJSON(src, mf.Config, &cfg); err != nil {
		return err
	}
	if len(cfg.RootFS.DiffIDs) != len(mf.Layers) {
		return fmt.Errorf("%s: %d layers but %d diff IDs", src, len(mf.Layers), len(cfg.RootFS.DiffIDs))
	}
	if err := os.MkdirAll(filepath.Join(dst, "blobs", "sha256"), 0o755); err != nil {
		return err
	}
	for i, l := range mf.Layers {
		desc, diffID, err := convertLayer(ctx, src, dst, l, prioritized)
		if err != nil {
			return fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
		}
		mf.Layers[i], cfg.RootFS.DiffIDs[i] = desc, diffID
	}
	var err error
	if mf.Config, err = writeJSON(dst, mf.Config.MediaType, cfg); err != nil {
		return err
	}
	mdesc, err := writeJSON(dst, ocispec.MediaTypeImageManifest, mf)
	if err != nil {
		return err
	}
	mdesc.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{mdesc}}
	b, err := json.Marshal(idx)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dst, ocispec.ImageIndexFile), b, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dst, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
}

// convertLayer rebuilds one layer as eStargz into dst and returns its
// descriptor and diff ID.
func convertLayer(ctx context.Context, src, dst string, l ocispec.Descriptor, prioritized []string) (ocispec.Descriptor, digest.Digest, error) {
	f, err := os.Open(blobPath(src, l.Digest))
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	opts := []estargz.Option{estargz.WithContext(ctx)}
	if len(prioritized) > 0 {
		// A layer holds only some of the files (a many-layer image).
		var missed []string
		opts = append(opts, estargz.WithPrioritizedFiles(prioritized), estargz.WithAllowPrioritizeNotFound(&missed))
	}
	blob, err := estargz.Build(io.NewSectionReader(f, 0, fi.Size()), opts...)
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer blob.Close()
	tmp, err := os.CreateTemp(filepath.Join(dst, "blobs", "sha256"), ".layer-")
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer os.Remove(tmp.Name())
	dg := digest.Canonical.Digester()
	n, err := io.Copy(io.MultiWriter(tmp, dg.Hash()), blob)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	size, err := blob.UncompressedSize()
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := os.Rename(tmp.Name(), blobPath(dst, dg.Digest())); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageLayerGzip,
		Digest:    dg.Digest(),
		Size:      n,
		Annotations: map[string]string{
			estargz.TOCJSONDigestAnnotation:         blob.TOCDigest().String(),
			estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(size, 10),
		},
	}, blob.DiffID(), nil
}

// manifestOf returns the descriptor of the manifest tagged tag in the
// layout dir (or its only manifest), or an empty one when there is none.
func manifestOf(dir, tag string) ocispec.Descriptor {
	var idx ocispec.Index
	b, err := os.ReadFile(filepath.Join(dir, ocispec.ImageIndexFile))
	if err != nil || json.Unmarshal(b, &idx) != nil {
		return ocispec.Descriptor{}
	}
	for _, m := range idx.Manifests {
		if m.Annotations[ocispec.AnnotationRefName] == tag || len(idx.Manifests) == 1 {
			return m
		}
	}
	return ocispec.Descriptor{}
}

func blobPath(dir string, d digest.Digest) string {
	return filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded())
}

func readJSON(dir string, d ocispec.Descriptor, v any) error {
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("%s: no image: %w", dir, err)
	}
	b, err := os.ReadFile(blobPath(dir, d.Digest))
	if err != nil {
		return err
	}
	if digest.FromBytes(b) != d.Digest {
		return fmt.Errorf("%s: blob %s is corrupt", dir, d.Digest)
	}
	return json.Unmarshal(b, v)
}

func writeJSON(dir, mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	return d, os.WriteFile(blobPath(dir, d.Digest), b, 0o644)
}

func readLines(file string) ([]string, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			out = append(out, l)
		}
	}
	return out, sc.Err()
}
