// Package snapshotter is strata's containerd snapshotter: overlay
// snapshots whose layers can be layer mounts.
//
// It implements containerd's whole snapshots API with ordinary overlayfs
// snapshots (so containerd can unpack any layer into it), and prepares layer
// snapshots remotely when containerd says which image layer a snapshot is
// for (the labels the CRI plugin and nerdctl set): it mounts the layer from
// the registry's expansion through package node and commits the snapshot at
// once, so containerd neither downloads nor unpacks it. Such a snapshot's
// directory is the layer's FUSE mount, used as an overlay lower by every
// snapshot above it. A layer that cannot be mounted so is prepared the
// ordinary way, and the log says why.
//
// State under the root (metadata in containerd's bbolt metastore):
//
//	<root>/
//	  metadata.db                      snapshots: keys, kinds, parents, labels, usage
//	  snapshots/<id>/fs/               an ordinary snapshot's directory (its upper while active)
//	  snapshots/<id>/work/             overlayfs's work directory of an active snapshot
//	  snapshots/<id>/remote.json       a remote snapshot: the layer it mounts (no fs/)
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/overlay"
	"github.com/strata-oci/strata/internal/remote"
)

// Layers is what the snapshotter uses of a node (node.Manager): it
// resolves images and mounts their layers lazily, shared and refcounted.
// Registries are reached as the node's hosts configuration says.
type Layers interface {
	// Resolve resolves ref to one platform's manifest and config.
	Resolve(ctx context.Context, ref remote.Reference) (*remote.Image, error)
	// MountLayer mounts layer l of the image whose manifest is manifest in
	// repo, bound to diffID, from the registry's layer mounts or an
	// expansion referrer of the manifest, and returns the directory to use
	// as an overlay lower; release drops the reference it holds (it may be
	// called more than once). A layer that has neither is an error
	// wrapping node.ErrNoLayerMount.
	MountLayer(ctx context.Context, repo remote.Repository, manifest digest.Digest, l ocispec.Descriptor, diffID digest.Digest) (dir string, release func(), err error)
}

// Options configure a Snapshotter.
type Options struct {
	// Root holds the metadata and the snapshots' directories.
	Root string
	// Layers mounts image layers for remote snapshots; nil disables them
	// (every snapshot is prepared the ordinary way).
	Layers Layers
	// Logger receives why layers were or were not mounted remotely; nil
	// discards.
	Logger *slog.Logger
}

// Snapshotter is a containerd snapshots.Snapshotter.
type Snapshotter struct {
	root   string
	ms     *storage.MetaStore
	layers Layers
	log    *slog.Logger

	mu      sync.Mutex
	remotes map[string]*remoteLayer // snapshot id → mounted layer
	images  imageCache
	closed  bool
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// Open opens (or creates) the snapshotter's state at opts.Root and mounts
// the layers of the remote snapshots recorded there.
func Open(ctx context.Context, opts Options) (*Snapshotter, error) {
	if err := os.MkdirAll(filepath.Join(opts.Root, "snapshots"), 0o700); err != nil {
		return nil, fmt.Errorf("snapshotter root: %w", err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(opts.Root, "metadata.db"))
	if err != nil {
		return nil, fmt.Errorf("snapshotter metadata: %w", err)
	}
	s := &Snapshotter{
		root: opts.Root, ms: ms, layers: opts.Layers, log: opts.Logger,
		remotes: map[string]*remoteLayer{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.restore(ctx)
	return s, nil
}

func (s *Snapshotter) dir(id string) string      { return filepath.Join(s.root, "snapshots", id) }
func (s *Snapshotter) fsPath(id string) string   { return filepath.Join(s.dir(id), "fs") }
func (s *Snapshotter) workPath(id string) string { return filepath.Join(s.dir(id), "work") }

// lower is the directory of committed snapshot id as an overlay lower: its
// fs/, or the layer mount of a remote snapshot.
func (s *Snapshotter) lower(id string) (string, error) {
	s.mu.Lock()
	r, ok := s.remotes[id]
	s.mu.Unlock()
	if !ok {
		return s.fsPath(id), nil
	}
	if r.err != nil {
		return "", fmt.Errorf("layer %s is not mounted: %w", r.rec.Layer.Digest, r.err)
	}
	return r.dir, nil
}

// Stat returns the info of the snapshot key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update changes the labels of a snapshot.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (out snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		out, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return out, err
}

// Usage returns the disk use of a snapshot, its parents excluded: measured
// now for an active snapshot, recorded at commit for a committed one (a
// remote snapshot uses no local disk for its files).
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.fsPath(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Mounts returns the mounts of the active or view snapshot key.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var snap storage.Snapshot
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("mounts of %s: %w", key, err)
	}
	return s.mounts(snap)
}

// Prepare creates an active snapshot key over parent. When the labels name
// an image layer and the snapshot it becomes (containerd unpacking an
// image), the layer is mounted remotely if it can be: the snapshot is then
// committed under the target name at once and Prepare fails with
// ErrAlreadyExists, which tells containerd the layer is there.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.prepare(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot key over parent, like Prepare.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.prepare(ctx, snapshots.KindView, key, parent, opts)
}

func (s *Snapshotter) prepare(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	if t, ok := targetOf(base.Labels); ok && s.layers != nil {
		err := s.prepareRemote(ctx, key, parent, t, opts)
		if err == nil {
			return nil, fmt.Errorf("target snapshot %q: %w", t.name, errdefs.ErrAlreadyExists)
		}
		s.log.WarnContext(ctx, "layer not mounted remotely; containerd will download and unpack it",
			"layer", t.layer, "image", t.image, "reason", err.Error())
	}
	return s.create(ctx, kind, key, parent, opts)
}

// create makes an ordinary snapshot.
func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, err error) {
	td, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
	if err != nil {
		return nil, fmt.Errorf("snapshot directory: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(td)
		}
	}()
	if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
		return nil, err
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
			return nil, err
		}
	}
	var snap storage.Snapshot
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("create snapshot %s: %w", key, err)
		}
		if len(snap.ParentIDs) > 0 {
			// The root of the union takes its owner from the upper directory.
			l, err := s.lower(snap.ParentIDs[0])
			if err != nil {
				return err
			}
			st, err := os.Stat(l)
			if err != nil {
				return fmt.Errorf("parent of %s: %w", key, err)
			}
			sys := st.Sys().(*syscall.Stat_t)
			if err := os.Lchown(filepath.Join(td, "fs"), int(sys.Uid), int(sys.Gid)); err != nil {
				return err
			}
		}
		return os.Rename(td, s.dir(snap.ID))
	})
	if err != nil {
		return nil, err
	}
	return s.mounts(snap)
}

// Commit turns the active snapshot key into the committed snapshot name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("commit %s: %s is a %s snapshot: %w", name, key, info.Kind, errdefs.ErrFailedPrecondition)
		}
		du, err := fs.DiskUsage(ctx, s.fsPath(id))
		if err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...); err != nil {
			return fmt.Errorf("commit %s: %w", name, err)
		}
		return nil
	})
}

// Remove removes the snapshot key, which must have no children; a remote
// snapshot's layer is unmounted when no other snapshot uses it.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var id string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		id, _, err = storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("remove snapshot %s: %w", key, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// The key is gone; what is left on disk is Cleanup's if this fails.
	s.dropRemote(id)
	if err := os.RemoveAll(s.dir(id)); err != nil {
		s.log.WarnContext(ctx, "cannot remove snapshot directory", "dir", s.dir(id), "err", err)
	}
	return nil
}

// Walk calls fn for every snapshot matching the filters (containerd's
// filter syntax: name, parent, kind, labels.<key>).
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes snapshot directories that no snapshot owns (left by a
// crash, or by a Remove that could not delete them).
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var ids map[string]string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	})
	if err != nil {
		return err
	}
	ents, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if _, ok := ids[e.Name()]; ok {
			continue
		}
		s.dropRemote(e.Name())
		if err := os.RemoveAll(s.dir(e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// closeWait bounds how long Close waits for layers to unmount.
const closeWait = 3 * time.Second

// Close releases the layers of remote snapshots and the metadata. The
// snapshots stay; Open mounts their layers again.
func (s *Snapshotter) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	remotes := s.remotes
	s.remotes = map[string]*remoteLayer{}
	s.mu.Unlock()
	// A layer still under an overlay mount (a running container) cannot
	// be unmounted cleanly: its FUSE connection lasts until this process
	// exits. Do not wait for those.
	var wg sync.WaitGroup
	for _, r := range remotes {
		if r.release != nil {
			wg.Go(r.release)
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(closeWait):
		s.log.Warn("layers still used by mounts are released when the process exits")
	}
	return s.ms.Close()
}

// mounts are the mounts of an active or view snapshot.
func (s *Snapshotter) mounts(snap storage.Snapshot) ([]mount.Mount, error) {
	lowers := make([]string, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		l, err := s.lower(id)
		if err != nil {
			return nil, err
		}
		lowers[i] = l
	}
	var upper, work string
	if snap.Kind == snapshots.KindActive {
		upper, work = s.fsPath(snap.ID), s.workPath(snap.ID)
	} else if len(lowers) == 0 {
		upper = s.fsPath(snap.ID) // an empty view
	}
	return Mounts(upper, work, lowers)
}

// Mounts plans the mounts of a snapshot: upper and work are the active
// snapshot's directories ("" for a view), lowers its parents' directories,
// nearest first. No lower is a bind mount of upper; a view of one lower is
// a read-only bind mount of it; anything else is overlayfs.
func Mounts(upper, work string, lowers []string) ([]mount.Mount, error) {
	if len(lowers) == 0 {
		flag := "rw"
		if work == "" {
			flag = "ro"
		}
		return []mount.Mount{{Type: "bind", Source: upper, Options: []string{flag, "rbind"}}}, nil
	}
	p, err := overlay.Plan(overlay.Spec{Lowers: lowers, Upper: upper, Work: work})
	if err != nil {
		return nil, err
	}
	if p.Type == "bind" {
		return []mount.Mount{{Type: "bind", Source: p.Source, Options: []string{"ro", "rbind"}}}, nil
	}
	var opts []string
	if p.ReadOnly {
		opts = append(opts, "ro")
	}
	opts = append(opts, p.Options...)
	opts = append(opts, "lowerdir="+strings.Join(p.Lowers, ":"))
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: opts}}, nil
}
