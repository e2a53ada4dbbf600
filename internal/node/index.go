package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// refetchIndexes fetches the saved indexes of img's lazy layers that are
// missing or damaged.
func (m *Manager) refetchIndexes(ctx context.Context, img *Image) error {
	diffIDs := img.Config.RootFS.DiffIDs
	if len(diffIDs) != len(img.Layers) {
		return fmt.Errorf("image %s: %d diff IDs for %d layers", img.Ref, len(diffIDs), len(img.Layers))
	}
	if img.PlainHTTP {
		m.client.Hosts().AllowPlainHTTP(img.Registry)
	}
	repo := remote.Repository{Registry: img.Registry, Name: img.Repo}
	for i, l := range img.Layers {
		if _, err := os.Stat(filepath.Join(layerDir(m.root, l.Digest), "unpacked")); err == nil {
			continue
		}
		if err := m.fetchIndex(ctx, repo, l, diffIDs[i]); err != nil {
			return err
		}
	}
	return nil
}

// An earlyIndex is a layer's index fetched before the image's config is
// there (see Pull).
type earlyIndex struct {
	done chan struct{}
	md   *api.MountDescriptor
	raw  []byte // nil: the node has the index already
	ix   *layerindex.Index
	err  error
}

// fetchIndex gets the layer's mount descriptor and index, verifies the index
// against the descriptor and binds it to the layer and diff ID the image
// names, and saves it.
func (m *Manager) fetchIndex(ctx context.Context, repo remote.Repository, l ocispec.Descriptor, diffID digest.Digest) error {
	md, raw, ix, err := m.getIndex(ctx, repo, l)
	if err != nil || raw == nil {
		return err
	}
	return m.saveIndex(l, diffID, md, raw, ix)
}

// getIndex asks for layer l's mount and fetches and decodes its index; raw
// is nil when the node has the index already.
func (m *Manager) getIndex(ctx context.Context, repo remote.Repository, l ocispec.Descriptor) (md *api.MountDescriptor, raw []byte, ix *layerindex.Index, err error) {
	if _, err := m.savedIndex(l.Digest); err == nil {
		return nil, nil, nil, nil
	}
	// One request for the index; the mount descriptor is what it names.
	d, raw, err := m.client.LayerIndex(ctx, repo, l.Digest)
	if err == nil {
		if ix, err = layerindex.Decode(raw); err != nil {
			return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
		}
		if ix.Layer != l.Digest {
			return nil, nil, nil, fmt.Errorf("layer %s: the registry's index is for layer %s", l.Digest, ix.Layer)
		}
		md = &api.MountDescriptor{
			Layer: l.Digest, DiffID: ix.DiffID, Version: ix.Version,
			Index: ocispec.Descriptor{MediaType: layerindex.MediaTypeIndex, Digest: d, Size: int64(len(raw))},
			Data:  ocispec.Descriptor{MediaType: layerindex.MediaTypeData, Digest: ix.Data, Size: ix.DataSize},
		}
		return md, raw, ix, nil
	}
	if !errors.Is(err, remote.ErrUnsupported) && !errors.Is(err, remote.ErrDigestMismatch) {
		return nil, nil, nil, err
	}
	m.log.Debug("index route unavailable, asking for the layer mount", "layer", l.Digest, "err", err)
	md, err = m.client.Mount(ctx, repo, l.Digest)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer mount %s: %w", l.Digest, err)
	}
	rc, err := m.client.FetchBlob(ctx, repo, md.Index)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	raw, err = io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	if ix, err = layerindex.Decode(raw); err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	return md, raw, ix, nil
}

// saveIndex binds index ix (raw) of layer l to l, diffID and the mount
// descriptor's data blob, and saves it; the decoded index is kept for the
// layer's mount.
func (m *Manager) saveIndex(l ocispec.Descriptor, diffID digest.Digest, md *api.MountDescriptor, raw []byte, ix *layerindex.Index) error {
	if ix.Layer != l.Digest || ix.DiffID != diffID || ix.Data != md.Data.Digest || ix.DataSize != md.Data.Size {
		return fmt.Errorf("layer %s: the registry's expansion is not bound to this image (index names layer %s, diff ID %s)", l.Digest, ix.Layer, ix.DiffID)
	}
	dir := layerDir(m.root, l.Digest)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// Neither is synced (a start waits for these writes, and with 24
	// layers their syncs took 120 ms here): savedIndex verifies the index
	// against the digest mount.json names, and a layer whose saved index
	// is damaged after a crash is fetched again.
	if err := atomicfile.WriteUnsynced(filepath.Join(dir, "index"), raw); err != nil {
		return err
	}
	meta, _ := json.Marshal(md)
	if err := atomicfile.WriteUnsynced(filepath.Join(dir, "mount.json"), meta); err != nil {
		return err
	}
	m.mu.Lock()
	if len(m.decoded) < maxDecoded {
		m.decoded[l.Digest] = ix
	}
	m.mu.Unlock()
	return nil
}

// savedIndex reads layer d's saved index and verifies it against the
// digest of its saved mount descriptor.
func (m *Manager) savedIndex(d digest.Digest) ([]byte, error) {
	dir := layerDir(m.root, d)
	meta, err := os.ReadFile(filepath.Join(dir, "mount.json"))
	if err != nil {
		return nil, err
	}
	var md api.MountDescriptor
	if err := json.Unmarshal(meta, &md); err != nil || md.Index.Digest.Validate() != nil {
		return nil, fmt.Errorf("saved mount descriptor of %s is damaged", d)
	}
	b, err := os.ReadFile(filepath.Join(dir, "index"))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != md.Index.Size || md.Index.Digest.Algorithm().FromBytes(b) != md.Index.Digest {
		return nil, fmt.Errorf("saved index of %s is damaged", d)
	}
	return b, nil
}

// maxDecoded bounds the decoded indexes kept between a pull and a mount.
const maxDecoded = 256

// errNotPulled: a layer of a pulled image has no (intact) saved index.
var errNotPulled = errors.New("not pulled")
