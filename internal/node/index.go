package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	var exps map[digest.Digest]api.LayerExpansion
	for i, l := range img.Layers {
		if _, err := os.Stat(filepath.Join(layerDir(m.root, l.Digest), "unpacked")); err == nil {
			continue
		}
		if _, err := m.savedIndex(l.Digest); err == nil && m.refused(l.Digest) == nil {
			continue
		}
		if img.Source != SourceReferrers {
			if err := m.fetchIndex(ctx, repo, l, diffIDs[i]); err != nil {
				return err
			}
			continue
		}
		if exps == nil {
			var err error
			if exps, err = m.findExpansion(ctx, repo, img.Digest); err != nil {
				return err
			}
		}
		md, raw, ix, err := m.getReferredIndex(ctx, repo, l, exps)
		if err == nil {
			err = m.saveIndex(l, diffIDs[i], md, raw, ix)
		}
		if err != nil {
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
	if err := m.refused(l.Digest); err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: %w: %w", l.Digest, errNotBound, err)
	}
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
	// The size the registry names is checked before anything is read, and
	// the read stops there: an index is held in memory whole.
	raw, err = m.client.Blob(ctx, repo, md.Index, remote.MaxIndexBytes)
	if errors.Is(err, remote.ErrUnsupported) || errors.Is(err, remote.ErrDigestMismatch) {
		// Too large, or not the bytes named: the layer is pulled whole.
		return nil, nil, nil, fmt.Errorf("layer %s index: %w: %w", l.Digest, errNotBound, err)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	if ix, err = layerindex.Decode(raw); err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w: %w", l.Digest, errNotBound, err)
	}
	return md, raw, ix, nil
}

// errNotBound: an expansion offered for a layer is not that layer's (its
// index names another layer, diff ID or data blob). The layer is pulled
// whole instead.
var errNotBound = errors.New("the expansion offered is not bound to this image")

// maxExpansionArtifacts bounds the expansion artifacts of one image a
// node reads (strata expand keeps one per manifest; more are stale or
// another tool's).
const maxExpansionArtifacts = 8

// findExpansion looks in repo for expansion artifacts that refer to image
// manifest md (the Referrers API, else the referrers tag) and returns the
// expansions they list, by layer; the first artifact to list a layer
// wins. An artifact that cannot be read or is malformed is skipped. None
// is an empty map and no error.
func (m *Manager) findExpansion(ctx context.Context, repo remote.Repository, md digest.Digest) (map[digest.Digest]api.LayerExpansion, error) {
	descs, err := m.client.Referrers(ctx, repo, md, api.ArtifactTypeExpansion)
	if err != nil {
		return nil, err
	}
	out := map[digest.Digest]api.LayerExpansion{}
	for i, d := range descs {
		if i == maxExpansionArtifacts {
			break
		}
		raw, err := m.client.Manifest(ctx, repo, d)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			m.log.Warn("expansion artifact cannot be read", "repo", repo, "artifact", d.Digest, "err", err)
			continue
		}
		exps, err := api.ParseExpansionArtifact(raw, md)
		if err != nil {
			m.log.Warn("expansion artifact refused", "repo", repo, "artifact", d.Digest, "err", err)
			continue
		}
		for l, e := range exps {
			if _, ok := out[l]; !ok {
				out[l] = e
			}
		}
	}
	return out, nil
}

// getReferredIndex fetches and decodes the index of layer l's expansion
// that an expansion artifact lists (exps, from findExpansion); raw is nil
// when the node has the index already. The index must name l (saveIndex
// then checks its diff ID and data blob).
func (m *Manager) getReferredIndex(ctx context.Context, repo remote.Repository, l ocispec.Descriptor, exps map[digest.Digest]api.LayerExpansion) (md *api.MountDescriptor, raw []byte, ix *layerindex.Index, err error) {
	if err := m.refused(l.Digest); err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: %w: %w", l.Digest, errNotBound, err)
	}
	if _, err := m.savedIndex(l.Digest); err == nil {
		return nil, nil, nil, nil
	}
	e, ok := exps[l.Digest]
	if !ok {
		return nil, nil, nil, fmt.Errorf("layer %s: %w: no expansion artifact lists it", l.Digest, remote.ErrNotFound)
	}
	// The data blob must be there, whole: asked while the index comes.
	dataSize := make(chan error, 1)
	go func() {
		n, err := m.client.BlobSize(ctx, repo, e.Data.Digest)
		switch {
		case errors.Is(err, remote.ErrNotFound):
			dataSize <- fmt.Errorf("data blob %s: %w", e.Data.Digest, err)
		case err == nil && n != e.Data.Size:
			dataSize <- fmt.Errorf("data blob %s is %d bytes, its artifact says %d", e.Data.Digest, n, e.Data.Size)
		default:
			// Some registries answer HEAD with redirects that do not
			// take it; every frame is verified anyway.
			if err != nil {
				m.log.Debug("data blob size unknown", "layer", l.Digest, "err", err)
			}
			dataSize <- nil
		}
	}()
	raw, err = m.client.Blob(ctx, repo, e.Index, remote.MaxIndexBytes)
	if derr := <-dataSize; err == nil && derr != nil {
		return nil, nil, nil, fmt.Errorf("layer %s: %w: %w", l.Digest, errNotBound, derr)
	}
	switch {
	case errors.Is(err, remote.ErrDigestMismatch) || errors.Is(err, remote.ErrUnsupported) || errors.Is(err, remote.ErrNotFound):
		return nil, nil, nil, fmt.Errorf("layer %s index: %w: %w", l.Digest, errNotBound, err)
	case err != nil:
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	if ix, err = layerindex.Decode(raw); err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w: %w", l.Digest, errNotBound, err)
	}
	if ix.Layer != l.Digest {
		return nil, nil, nil, fmt.Errorf("layer %s: %w: its index is of layer %s", l.Digest, errNotBound, ix.Layer)
	}
	md = &api.MountDescriptor{
		Layer: l.Digest, DiffID: ix.DiffID, Version: ix.Version,
		Index: ocispec.Descriptor{MediaType: layerindex.MediaTypeIndex, Digest: e.Index.Digest, Size: e.Index.Size},
		Data:  ocispec.Descriptor{MediaType: layerindex.MediaTypeData, Digest: e.Data.Digest, Size: e.Data.Size},
	}
	return md, raw, ix, nil
}

// saveIndex binds index ix (raw) of layer l to l, diffID and the mount
// descriptor's data blob, and saves it; the decoded index is kept for the
// layer's mount.
func (m *Manager) saveIndex(l ocispec.Descriptor, diffID digest.Digest, md *api.MountDescriptor, raw []byte, ix *layerindex.Index) error {
	if ix.Layer != l.Digest || ix.DiffID != diffID || ix.Data != md.Data.Digest || ix.DataSize != md.Data.Size {
		return fmt.Errorf("layer %s: %w (index names layer %s, diff ID %s, data %s)", l.Digest, errNotBound, ix.Layer, ix.DiffID, ix.Data)
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

// savedDescriptor reads layer d's saved mount descriptor.
func (m *Manager) savedDescriptor(d digest.Digest) (*api.MountDescriptor, error) {
	meta, err := os.ReadFile(filepath.Join(layerDir(m.root, d), "mount.json"))
	if err != nil {
		return nil, err
	}
	var md api.MountDescriptor
	if err := json.Unmarshal(meta, &md); err != nil || md.Index.Digest.Validate() != nil {
		return nil, fmt.Errorf("saved mount descriptor of %s is damaged", d)
	}
	return &md, nil
}

// savedIndex reads layer d's saved index and verifies it against the
// digest of its saved mount descriptor.
func (m *Manager) savedIndex(d digest.Digest) ([]byte, error) {
	md, err := m.savedDescriptor(d)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(layerDir(m.root, d), "index"))
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
