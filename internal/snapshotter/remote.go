package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/remote"
)

// Snapshot labels. containerd sets LabelTargetRef on the snapshot it
// unpacks a layer into (the chain ID it will commit it as); the CRI plugin,
// nerdctl and containerd's Go client (snapshotters.AppendInfoHandlerWrapper)
// add the image and layer labels. LabelLayer marks strata's remote
// snapshots.
const (
	LabelTargetRef      = "containerd.io/snapshot.ref"
	LabelImageRef       = "containerd.io/snapshot/cri.image-ref"
	LabelLayerDigest    = "containerd.io/snapshot/cri.layer-digest"
	LabelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	LabelLayer          = "containerd.io/snapshot/strata.layer"
)

// imageTTL is how long a resolved image is reused for the next layers of
// the same pull.
const imageTTL = time.Minute

// target is a layer snapshot containerd asks for.
type target struct {
	name     string // the chain ID to commit as
	image    string // image reference
	manifest string // manifest digest, if known
	layer    digest.Digest
}

func targetOf(labels map[string]string) (target, bool) {
	t := target{
		name:     labels[LabelTargetRef],
		image:    labels[LabelImageRef],
		manifest: labels[LabelManifestDigest],
		layer:    digest.Digest(labels[LabelLayerDigest]),
	}
	return t, t.name != "" && t.image != "" && t.layer != ""
}

// remoteRecord is a remote snapshot's remote.json: enough to mount its layer
// again after a restart (the registry is reached as the node's hosts
// configuration says; a plainHTTP field of older records is ignored).
type remoteRecord struct {
	Ref        string `json:"ref"`
	Registry   string `json:"registry"`
	Repository string `json:"repository"`
	// Manifest is the image manifest the layer was mounted for (its
	// expansion referrer names it; empty in older records).
	Manifest digest.Digest      `json:"manifest,omitempty"`
	Layer    ocispec.Descriptor `json:"layer"`
	DiffID   digest.Digest      `json:"diffID"`
}

// remoteLayer is the mounted layer of a remote snapshot.
type remoteLayer struct {
	rec     remoteRecord
	dir     string
	release func()
	err     error // why the layer could not be mounted again after a restart
}

type cachedImage struct {
	img *remote.Image
	at  time.Time
}

type imageCache map[string]cachedImage

// prepareRemote mounts t's layer and commits it as the snapshot t.name over
// parent. A nil error means the target snapshot exists now.
func (s *Snapshotter) prepareRemote(ctx context.Context, key, parent string, t target, opts []snapshots.Opt) error {
	if info, err := s.Stat(ctx, t.name); err == nil {
		if info.Kind == snapshots.KindCommitted && info.Parent == parent {
			return nil
		}
		return fmt.Errorf("snapshot %s exists with another parent or kind", t.name)
	}
	ref, err := remote.ParseReference(t.image)
	if err != nil {
		return err
	}
	ctx = remote.WithImageRef(ctx, t.image) // its credentials (a pull secret)
	if t.manifest != "" {
		if d, err := digest.Parse(t.manifest); err == nil {
			ref.Digest = d
		}
	}
	img, err := s.resolve(ctx, ref)
	if err != nil {
		return err
	}
	desc, diffID, err := layerOf(img, t.layer, digest.Digest(t.name))
	if err != nil {
		return err
	}
	dir, release, err := s.layers.MountLayer(ctx, ref.Repository, img.Digest, desc, diffID)
	if err != nil {
		return err
	}
	rec := remoteRecord{
		Ref: ref.String(), Registry: ref.Registry, Repository: ref.Name,
		Manifest: img.Digest, Layer: desc, DiffID: diffID,
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	var id string
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		snap, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, opts...)
		if err != nil {
			return err
		}
		id = snap.ID
		if err := os.MkdirAll(s.dir(id), 0o700); err != nil {
			return err
		}
		if err := atomicfile.Write(filepath.Join(s.dir(id), "remote.json"), b); err != nil {
			return err
		}
		copts := append(append([]snapshots.Opt{}, opts...), snapshots.WithLabels(map[string]string{LabelLayer: desc.Digest.String()}))
		_, err = storage.CommitActive(ctx, key, t.name, snapshots.Usage{}, copts...)
		return err
	})
	if err != nil {
		release()
		if id != "" {
			os.RemoveAll(s.dir(id))
		}
		if _, serr := s.Stat(ctx, t.name); serr == nil && errors.Is(err, errdefs.ErrAlreadyExists) {
			return nil // a concurrent Prepare committed it
		}
		return fmt.Errorf("commit remote snapshot %s: %w", t.name, err)
	}
	s.mu.Lock()
	s.remotes[id] = &remoteLayer{rec: rec, dir: dir, release: release}
	s.mu.Unlock()
	s.log.InfoContext(ctx, "layer mounted remotely", "layer", desc.Digest, "image", rec.Ref, "snapshot", t.name)
	return nil
}

// resolve resolves ref, reusing a recent resolution: containerd prepares
// an image's layers one after another.
func (s *Snapshotter) resolve(ctx context.Context, ref remote.Reference) (*remote.Image, error) {
	k := ref.String()
	s.mu.Lock()
	c, ok := s.images[k]
	s.mu.Unlock()
	if ok && time.Since(c.at) < imageTTL {
		return c.img, nil
	}
	img, err := s.layers.Resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.images == nil {
		s.images = imageCache{}
	}
	for k, c := range s.images {
		if time.Since(c.at) >= imageTTL {
			delete(s.images, k)
		}
	}
	s.images[k] = cachedImage{img: img, at: time.Now()}
	s.mu.Unlock()
	return img, nil
}

// layerOf finds the layer of img that containerd unpacks as the snapshot
// chain: the layer digest must be in the manifest at a position whose chain
// of diff IDs (from the config) is chain. This binds what is mounted to
// what containerd resolved.
func layerOf(img *remote.Image, layer, chain digest.Digest) (ocispec.Descriptor, digest.Digest, error) {
	diffIDs := img.Config.RootFS.DiffIDs
	for i, l := range img.Manifest.Layers {
		if l.Digest != layer || i >= len(diffIDs) {
			continue
		}
		if identity.ChainID(diffIDs[:i+1]) == chain {
			return l, diffIDs[i], nil
		}
	}
	return ocispec.Descriptor{}, "", fmt.Errorf("image %s (%s) has no layer %s with chain ID %s: not the image containerd resolved",
		img.Ref, img.Digest, layer, chain)
}

// restore mounts the layers of the remote snapshots on disk again.
func (s *Snapshotter) restore(ctx context.Context) {
	var ids map[string]string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	}); err != nil {
		s.log.WarnContext(ctx, "cannot list snapshots", "err", err)
		return
	}
	paths, _ := filepath.Glob(filepath.Join(s.root, "snapshots", "*", "remote.json"))
	for _, p := range paths {
		id := filepath.Base(filepath.Dir(p))
		if _, ok := ids[id]; !ok {
			continue // removed; Cleanup deletes the directory
		}
		r := &remoteLayer{}
		b, err := os.ReadFile(p)
		if err == nil {
			err = json.Unmarshal(b, &r.rec)
		}
		switch {
		case err != nil:
		case s.layers == nil:
			err = errors.New("layer mounts are not configured")
		default:
			repo := remote.Repository{Registry: r.rec.Registry, Name: r.rec.Repository}
			r.dir, r.release, err = s.layers.MountLayer(remote.WithImageRef(ctx, r.rec.Ref), repo, r.rec.Manifest, r.rec.Layer, r.rec.DiffID)
		}
		if err != nil {
			r.err = err
			s.log.ErrorContext(ctx, "cannot mount the layer of a remote snapshot", "snapshot", ids[id], "layer", r.rec.Layer.Digest, "err", err)
		}
		s.mu.Lock()
		s.remotes[id] = r
		s.mu.Unlock()
	}
}

// dropRemote releases the layer of remote snapshot id, if it is one.
func (s *Snapshotter) dropRemote(id string) {
	s.mu.Lock()
	r, ok := s.remotes[id]
	delete(s.remotes, id)
	s.mu.Unlock()
	if ok && r.release != nil {
		r.release()
	}
}
