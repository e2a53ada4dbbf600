// Package ocilayout builds small OCI images as image layouts on disk, for
// tests, the demo and the benchmark harness: a layer from a list of files,
// a config from an image-spec config, an index.json with a tag, so that
// standard tools (skopeo, umoci) can push them anywhere.
package ocilayout

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Entry is one tar entry of a layer.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg when zero
	Mode     int64
	UID, GID int
	Content  []byte
	Linkname string
	ModTime  time.Time
	Xattrs   map[string]string
	// Devmajor and Devminor: a device node's number.
	Devmajor, Devminor int64
}

// Tar returns the uncompressed tar stream of entries, in order.
func Tar(entries []Entry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		typ := e.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.Mode
		if mode == 0 {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		mt := e.ModTime
		if mt.IsZero() {
			mt = time.Unix(1700000000, 0)
		}
		h := &tar.Header{Name: e.Name, Typeflag: typ, Mode: mode, Uid: e.UID, Gid: e.GID, Linkname: e.Linkname, ModTime: mt, Format: tar.FormatPAX,
			Devmajor: e.Devmajor, Devminor: e.Devminor}
		if typ == tar.TypeReg {
			h.Size = int64(len(e.Content))
		}
		if len(e.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write(e.Content); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Gzip compresses b.
func Gzip(b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

// Layer is a layer blob with its media type and the digest of its
// uncompressed tar (diff ID).
type Layer struct {
	Blob      []byte
	MediaType string
	DiffID    digest.Digest
}

// GzipLayer makes a gzip layer of a tar stream.
func GzipLayer(tarStream []byte) Layer {
	return Layer{Blob: Gzip(tarStream), MediaType: ocispec.MediaTypeImageLayerGzip, DiffID: digest.FromBytes(tarStream)}
}

// Image is what Write writes.
type Image struct {
	Layers []Layer
	Config ocispec.ImageConfig
}

// Write writes img as an OCI image layout at dir (created or extended),
// tagged tag, and returns the manifest digest.
func Write(dir, tag string, img Image) (digest.Digest, error) {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return "", err
	}
	put := func(b []byte) (digest.Digest, error) {
		d := digest.FromBytes(b)
		return d, os.WriteFile(filepath.Join(blobs, d.Encoded()), b, 0o644)
	}
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		Config:   img.Config,
		RootFS:   ocispec.RootFS{Type: "layers"},
	}
	var layers []ocispec.Descriptor
	for _, l := range img.Layers {
		d, err := put(l.Blob)
		if err != nil {
			return "", err
		}
		layers = append(layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: d, Size: int64(len(l.Blob))})
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
	}
	cb, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	cd, err := put(cb)
	if err != nil {
		return "", err
	}
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cd, Size: int64(len(cb))},
		Layers:    layers,
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return "", err
	}
	md, err := put(mb)
	if err != nil {
		return "", err
	}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	if b, err := os.ReadFile(filepath.Join(dir, "index.json")); err == nil {
		if err := json.Unmarshal(b, &idx); err != nil {
			return "", fmt.Errorf("existing index.json: %w", err)
		}
	}
	kept := idx.Manifests[:0]
	for _, d := range idx.Manifests {
		if d.Annotations[ocispec.AnnotationRefName] != tag {
			kept = append(kept, d)
		}
	}
	idx.Manifests = append(kept, ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageManifest,
		Digest:      md,
		Size:        int64(len(mb)),
		Annotations: map[string]string{ocispec.AnnotationRefName: tag},
	})
	ib, err := json.Marshal(idx)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "index.json"), ib, 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return "", err
	}
	return md, nil
}
