package layerfs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// What the kernel may keep so that a warm walk of a layer's tree asks the
// daemon as little as possible (docs/benchmarks.md, "Warm tree walks"): a
// layer never changes once mounted.
var (
	_ = (fs.NodeOpendirHandler)((*node)(nil))
	_ = (fs.NodeFlusher)((*node)(nil))
	_ = (fs.FileReaddirenter)((*dirHandle)(nil))
	_ = (fs.FileSeekdirer)((*dirHandle)(nil))
	_ = (fs.FileReleasedirer)((*dirHandle)(nil))
)

// OpendirHandle lets the kernel cache what a directory lists
// (FOPEN_CACHE_DIR, FOPEN_KEEP_CACHE): a listing of a directory listed
// before, by any process, is served from the kernel's cache with no
// READDIRPLUS. (OPENDIR and RELEASEDIR still come each time.)
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if errno := n.fs.refuse(); errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{fs: n.fs, list: n.dirEntries()}, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// Flush answers ENOSYS, which tells the kernel never to send FLUSH again
// on this mount (a read-only file has nothing to flush), instead of a
// round trip on every close(2).
func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	n.fs.st.flushes.Add(1)
	return syscall.ENOSYS
}

// dirHandle is an open directory: its entries, read in order.
type dirHandle struct {
	fs   *FS
	list []fuse.DirEntry
	pos  int
}

func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	if d.pos == 0 {
		d.fs.st.dirListings.Add(1)
	}
	if d.pos >= len(d.list) {
		return nil, 0
	}
	e := d.list[d.pos]
	d.pos++
	e.Off = uint64(d.pos)
	return &e, 0
}

func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	if off > uint64(len(d.list)) {
		return syscall.EINVAL
	}
	d.pos = int(off)
	return 0
}

func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {}
