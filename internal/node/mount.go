package node

import (
	"context"

	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/overlay"
)

// A Mounter performs the node's mounts: the node decides what to mount
// (which layer file system where, which lowers in which order) and the
// mounter asks the kernel. It is the seam where tests run the node's logic
// (pulls, leases, sharing, lingering, restore) without root.
type Mounter interface {
	// MountLayer serves the lazy layer fs at dir (FUSE).
	MountLayer(ctx context.Context, dir string, fs *layerfs.FS) (LayerMount, error)
	// MountUnion mounts the read-only union of lowers (top first) at dir.
	MountUnion(dir string, lowers []string) error
	// Unmount unmounts whatever is mounted at dir; detach unmounts it
	// lazily (it goes once its users leave). Nothing mounted is no error.
	Unmount(dir string, detach bool) error
}

// A LayerMount is a mounted lazy layer (layerfs.Server).
type LayerMount interface {
	// SetReadahead sets the kernel's readahead on the mount and returns
	// the value before.
	SetReadahead(kb int) (old int, err error)
	// Unmount unmounts it; it fails while the mount is in use.
	Unmount() error
}

// KernelMounter mounts with FUSE (layerfs) and overlayfs (overlay).
type KernelMounter struct{}

// MountLayer mounts fs at dir with FUSE.
func (KernelMounter) MountLayer(ctx context.Context, dir string, fs *layerfs.FS) (LayerMount, error) {
	return fs.Mount(ctx, dir)
}

// MountUnion mounts an overlayfs of lowers at dir, read-only, nosuid and
// nodev: a view of an image, at a path any user may reach, must not give
// them its setuid binaries or device nodes.
func (KernelMounter) MountUnion(dir string, lowers []string) error {
	plan, err := overlay.Plan(overlay.Spec{Lowers: lowers})
	if err != nil {
		return err
	}
	plan.NoSuid = true
	return plan.Do(dir)
}

// Unmount unmounts dir.
func (KernelMounter) Unmount(dir string, detach bool) error { return overlay.Unmount(dir, detach) }
