package layerfs

import (
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
)

// refusal is an FS's refused state (Refuse) and the roots of its mounts,
// whose files' cached pages a refusal drops.
type refusal struct {
	refused atomic.Bool
	mu      sync.Mutex
	roots   []*node
}

// Refuse makes f refuse its content from now on: its layer was found not
// to be what its index says (the node's background verification). Opens,
// reads, lookups, directory listings and link reads fail with EIO, and
// the kernel is told to drop the pages it keeps of f's files, so that
// reads of files open already come here, and fail, too. A file opened
// with passthrough before reads the node's cache directly: the kernel
// does not ask this process, and cannot be stopped (its content is the
// file whose digest the index names, verified, but what that file is for
// the layer is the index's claim).
func (f *FS) Refuse(reason error) {
	if f.refusal.refused.Swap(true) {
		return
	}
	f.log.Error("layerfs: layer refused: reads fail with EIO from now on", "layer", f.ix.Layer, "reason", reason)
	f.refusal.mu.Lock()
	roots := append([]*node(nil), f.refusal.roots...)
	f.refusal.mu.Unlock()
	// Not under a lock, nor in the caller's way: the kernel may wait for
	// reads under way to end before it drops their pages.
	go func() {
		for _, r := range roots {
			dropPages(r.EmbeddedInode())
		}
	}()
}

// Refused reports whether Refuse was called.
func (f *FS) Refused() bool { return f.refusal.refused.Load() }

// refuse returns EIO when f is refused.
func (f *FS) refuse() syscall.Errno {
	if f.refusal.refused.Load() {
		return syscall.EIO
	}
	return 0
}

func (f *FS) addRoot(n *node) {
	f.refusal.mu.Lock()
	f.refusal.roots = append(f.refusal.roots, n)
	f.refusal.mu.Unlock()
}

// dropPages tells the kernel to drop the cached pages of the regular files
// below in (those it looked up).
func dropPages(in *fs.Inode) {
	for _, c := range in.Children() {
		switch {
		case c.IsDir():
			dropPages(c)
		case c.Mode()&syscall.S_IFMT == syscall.S_IFREG:
			c.NotifyContent(0, 0) // 0: to the end; fails once unmounted
		}
	}
}
