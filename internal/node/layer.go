package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/remote"
)

// ErrNoLayerMount reports that a layer cannot be served as a layer mount
// (the registry offers none, or refuses this layer); the caller pulls the
// layer the ordinary way.
var ErrNoLayerMount = errors.New("no layer mount")

// Resolve resolves ref to one platform's manifest and config, without
// recording an image. It is for callers that manage images themselves (the
// containerd snapshotter), one layer at a time with MountLayer.
func (m *Manager) Resolve(ctx context.Context, ref remote.Reference) (*remote.Image, error) {
	return m.client.Resolve(ctx, ref)
}

// MountLayer mounts one layer of an image in repo as a layer mount (FUSE,
// shared and refcounted with every other user of the layer) and returns the
// directory to use as an overlay lower. The layer's index is fetched once
// and bound to l and diffID, as for Pull. Every successful call holds one
// reference, which release drops (the layer is unmounted with its last
// reference); release may be called more than once.
//
// A registry without layer mounts, or a layer it cannot expand, is an error
// wrapping ErrNoLayerMount whose text says why. A layer this node already
// unpacked (a fallback Pull) is returned as its unpacked tree.
func (m *Manager) MountLayer(ctx context.Context, repo remote.Repository, l ocispec.Descriptor, diffID digest.Digest) (dir string, release func(), err error) {
	// A layer whose index this node holds is mounted without asking the
	// registry (a restarted snapshotter restores its snapshots offline).
	if _, err := os.Stat(filepath.Join(layerDir(m.root, l.Digest), "index")); err != nil {
		if lazy, reason := m.offersMounts(ctx, repo.Registry); !lazy {
			return "", nil, fmt.Errorf("layer %s: %w: %s", l.Digest, ErrNoLayerMount, reason)
		}
	}
	if err := m.fetchIndex(ctx, repo, l, diffID); err != nil {
		if errors.Is(err, remote.ErrExpansionFailed) || errors.Is(err, remote.ErrNotFound) {
			return "", nil, fmt.Errorf("%w: %w", ErrNoLayerMount, err)
		}
		return "", nil, err
	}
	ly, err := m.ref(ctx, &Image{Registry: repo.Registry, Repo: repo.Name}, l, nil)
	if err != nil {
		return "", nil, err
	}
	var once sync.Once
	return ly.dir, func() { once.Do(func() { m.unref(ly) }) }, nil
}

// OffersMounts reports whether registry serves layer mounts (asked once and
// remembered), and if not, why.
func (m *Manager) OffersMounts(ctx context.Context, registry string) (bool, string) {
	return m.offersMounts(ctx, registry)
}
