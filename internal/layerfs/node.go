package layerfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/layerindex"
)

// The FUSE operations a node implements. Everything else (writes, creation,
// removal, setattr, setxattr) is refused by go-fuse or by the kernel for a
// read-only mount.
var (
	_ = (fs.NodeLookuper)((*node)(nil))
	_ = (fs.NodeReaddirer)((*node)(nil))
	_ = (fs.NodeGetattrer)((*node)(nil))
	_ = (fs.NodeReadlinker)((*node)(nil))
	_ = (fs.NodeGetxattrer)((*node)(nil))
	_ = (fs.NodeListxattrer)((*node)(nil))
	_ = (fs.NodeOpener)((*node)(nil))
	_ = (fs.NodeStatfser)((*node)(nil))

	_ = (fs.FileReader)((*servedFile)(nil))
	_ = (fs.FileReleaser)((*servedFile)(nil))
	_ = (fs.FileReader)((*cachedFile)(nil))
	_ = (fs.FileReleaser)((*cachedFile)(nil))
	_ = (fs.FilePassthroughFder)((*cachedFile)(nil))
)

// opaqueXattr marks an opaque directory for overlayfs.
const opaqueXattr = "trusted.overlay.opaque"

// A node is one inode: the entry i of the index. The inode of a hardlink
// is that of the Reg entry it names, so all names of a file share one
// node.
type node struct {
	fs.Inode
	fs  *FS
	mnt *mountState
	i   int

	// The kernel refuses to open an inode with passthrough while it has
	// files open without, and the reverse (EIO), so a file's open handles
	// are all of one kind.
	mu     sync.Mutex
	served int // open servedFiles
	cached int // open cachedFiles
}

func (n *node) entry() *layerindex.Entry { return &n.fs.ix.Entries[n.i] }

func typeBits(t layerindex.Type) uint32 {
	switch t {
	case layerindex.TypeDir:
		return syscall.S_IFDIR
	case layerindex.TypeSymlink:
		return syscall.S_IFLNK
	case layerindex.TypeChar, layerindex.TypeWhiteout:
		return syscall.S_IFCHR
	case layerindex.TypeBlock:
		return syscall.S_IFBLK
	case layerindex.TypeFIFO:
		return syscall.S_IFIFO
	}
	return syscall.S_IFREG
}

// inode returns the entry holding the attributes of entry i: the file a
// hardlink names, or i itself.
func (f *FS) inode(i int) int {
	if j, ok := f.primary[i]; ok {
		return j
	}
	return i
}

// fillAttr describes entry i, which is not a hardlink.
func (f *FS) fillAttr(i int, out *fuse.Attr) {
	e := &f.ix.Entries[i]
	out.Ino = uint64(i) + 1
	out.Mode = typeBits(e.Type) | e.Mode&layerindex.ModeMask
	out.Nlink = f.ix.Nlink(i)
	out.Uid, out.Gid = e.UID, e.GID
	out.Blksize = 4096
	switch e.Type {
	case layerindex.TypeReg:
		out.Size = uint64(e.Size)
		out.Blocks = (out.Size + 511) / 512
	case layerindex.TypeDir:
		out.Size = 4096
		out.Blocks = 8
	case layerindex.TypeSymlink:
		out.Mode = syscall.S_IFLNK | 0o777 // as on every Linux file system
		out.Size = uint64(len(e.Linkname))
	case layerindex.TypeChar, layerindex.TypeBlock:
		out.Rdev = uint32(unix.Mkdev(e.Devmajor, e.Devminor))
	case layerindex.TypeWhiteout:
		// An overlayfs whiteout: character device 0/0, mode 0.
		out.Mode = syscall.S_IFCHR
	}
	// The format's times are signed; the kernel reads these fields as such.
	out.Mtime, out.Mtimensec = uint64(e.ModTime), e.ModNsec
	out.Atime, out.Atimensec = out.Mtime, out.Mtimensec
	out.Ctime, out.Ctimensec = out.Mtime, out.Mtimensec
}

func (n *node) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fs.fillAttr(n.i, &out.Attr)
	return 0
}

func baseName(p string) string { return p[strings.LastIndexByte(p, '/')+1:] }

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if errno := n.fs.refuse(); errno != 0 {
		return nil, errno
	}
	ix := n.fs.ix
	kids := ix.Children(n.i)
	k := sort.Search(len(kids), func(k int) bool { return baseName(ix.Entries[kids[k]].Path) >= name })
	if k == len(kids) || baseName(ix.Entries[kids[k]].Path) != name {
		return nil, syscall.ENOENT
	}
	i := n.fs.inode(int(kids[k]))
	n.fs.fillAttr(i, &out.Attr)
	child := &node{fs: n.fs, mnt: n.mnt, i: i}
	return n.NewInode(ctx, child, fs.StableAttr{Mode: typeBits(ix.Entries[i].Type), Ino: uint64(i) + 1}), 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	return fs.NewListDirStream(n.dirEntries()), 0
}

// dirEntries lists the directory's entries.
func (n *node) dirEntries() []fuse.DirEntry {
	ix := n.fs.ix
	kids := ix.Children(n.i)
	list := make([]fuse.DirEntry, len(kids))
	for k, c := range kids {
		i := n.fs.inode(int(c))
		list[k] = fuse.DirEntry{
			Name: baseName(ix.Entries[c].Path),
			Ino:  uint64(i) + 1,
			Mode: typeBits(ix.Entries[i].Type),
		}
	}
	return list
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if errno := n.fs.refuse(); errno != 0 {
		return nil, errno
	}
	e := n.entry()
	if e.Type != layerindex.TypeSymlink {
		return nil, syscall.EINVAL
	}
	return []byte(e.Linkname), 0
}

// xattrs returns the extended attributes of the node, with the marker of
// an opaque directory.
func (n *node) xattrs() []layerindex.Xattr {
	e := n.entry()
	if e.Type == layerindex.TypeDir && e.Opaque {
		return append(e.Xattrs[:len(e.Xattrs):len(e.Xattrs)], layerindex.Xattr{Name: opaqueXattr, Value: "y"})
	}
	return e.Xattrs
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	for _, x := range n.xattrs() {
		if x.Name != attr {
			continue
		}
		if len(dest) < len(x.Value) {
			return uint32(len(x.Value)), syscall.ERANGE
		}
		return uint32(copy(dest, x.Value)), 0
	}
	return 0, syscall.ENODATA
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	var b []byte
	for _, x := range n.xattrs() {
		b = append(b, x.Name...)
		b = append(b, 0)
	}
	if len(dest) < len(b) {
		return uint32(len(b)), syscall.ERANGE
	}
	return uint32(copy(dest, b)), 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = 4096
	out.Frsize = 4096
	out.Blocks = uint64(n.fs.ix.StreamSize+4095) / 4096
	out.Files = uint64(len(n.fs.ix.Entries))
	out.NameLen = layerindex.MaxNameLength
	return 0
}

// Open opens a regular file: with passthrough when its content is, or can
// be put, whole in the cache, and no served handle is open; otherwise with
// reads served from the frames.
func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	e := n.entry()
	if e.Type != layerindex.TypeReg {
		return nil, 0, syscall.EINVAL
	}
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	if errno := n.fs.refuse(); errno != 0 {
		return nil, 0, errno
	}
	if c := n.fs.opts.Completer; c != nil {
		c.Busy()
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.served == 0 {
		if f := n.openCached(ctx, e); f != nil {
			n.cached++
			n.fs.st.passthroughOpens.Add(1)
			return &cachedFile{n: n, f: f}, fuse.FOPEN_KEEP_CACHE, 0
		}
	}
	n.served++
	n.fs.st.servedOpens.Add(1)
	return &servedFile{n: n}, fuse.FOPEN_KEEP_CACHE, 0
}

// openCached opens the file's content in the cache, putting it there if
// it is small enough, when the kernel takes it as a passthrough backing
// file. It returns nil otherwise.
func (n *node) openCached(ctx context.Context, e *layerindex.Entry) *cache.File {
	f := n.fs
	if f.cache == nil || f.opts.DisablePassthrough || e.Size == 0 || n.mnt.passthrough.Load() < 0 {
		return nil
	}
	cf, err := f.cache.OpenFile(ctx, e.Digest)
	if errors.Is(err, cache.ErrNotFound) && e.Size <= f.opts.MaterializeMax && f.cheapToMaterialize(e) {
		if err = f.materialize(ctx, e); err == nil {
			cf, err = f.cache.OpenFile(ctx, e.Digest)
		}
	}
	if err != nil {
		if !errors.Is(err, cache.ErrNotFound) {
			f.log.Debug("layerfs: no passthrough", "path", e.Path, "err", err)
		}
		return nil
	}
	if !n.mnt.canPassthrough(f.log, cf.Fd()) {
		cf.Close()
		return nil
	}
	return cf
}

// cheapToMaterialize reports whether putting e whole into the cache costs
// no more from the source than reading it probably does: a small file (a
// read of it fetches its frames anyway), or one whose frames are all on the
// node or on their way (a prefetch). A larger file that is not is served
// from its frames this time: a process that maps a library and touches a
// tenth of it must not wait for the rest, and a start-up profile records
// only what was read.
func (f *FS) cheapToMaterialize(e *layerindex.Entry) bool {
	if e.Size <= materializeAlways {
		return true
	}
	if f.fetch.recording() {
		// Reads through the cache are not seen: the recording would list
		// the whole file, not the pages read.
		return false
	}
	if ps, ok := f.src().(PageSource); ok && ps.CoversPages(e.Offset, e.Size) {
		return true
	}
	first, last := f.ix.FramesFor(e.Offset, e.Size)
	return f.fetch.local(first, last)
}

// materializeAlways is the size up to which a file is put whole into the
// cache on open even when that fetches it.
const materializeAlways = 64 << 10

// materialize puts the whole content of e into the cache, verified.
func (f *FS) materialize(ctx context.Context, e *layerindex.Entry) error {
	buf := make([]byte, e.Size)
	ok := f.readPages(ctx, buf, e.Offset, e, 0)
	if ok && fileDigest(buf) != e.Digest {
		// The source's pages are not this file's content: the frames,
		// verified against the index, decide.
		f.log.Warn("layerfs: pages do not hold the file's content", "path", e.Path)
		ok = false
	} else if err := ctx.Err(); !ok && err != nil {
		return err // interrupted: no fetch for nobody
	}
	if !ok {
		first, last := f.ix.FramesFor(e.Offset, e.Size)
		frames, err := f.fetch.frames(ctx, first, last)
		if err != nil {
			return err
		}
		buf = buf[:0]
		for k, data := range frames {
			fr := &f.ix.Frames[first+k]
			lo := max(e.Offset-fr.UOffset, 0)
			hi := min(e.Offset+e.Size-fr.UOffset, fr.USize)
			buf = append(buf, data[lo:hi]...)
		}
		if int64(len(buf)) != e.Size || fileDigest(buf) != e.Digest {
			return layerindex.ErrInvalidFrame // the index contradicts itself
		}
	}
	if err := f.cache.PutFile(ctx, e.Digest, e.Size, bytes.NewReader(buf)); err != nil {
		return err
	}
	f.st.materialized.Add(1)
	return nil
}

func fileDigest(b []byte) digest.Digest {
	sum := sha256.Sum256(b)
	return digest.NewDigestFromBytes(digest.SHA256, sum[:])
}

// readAt reads the content of the file e at off into dest, from the
// frames, and returns the bytes read.
func (f *FS) readAt(ctx context.Context, e *layerindex.Entry, dest []byte, off int64) ([]byte, error) {
	if off >= e.Size || len(dest) == 0 {
		return dest[:0], nil
	}
	end := min(off+int64(len(dest)), e.Size)
	if f.readPages(ctx, dest[:end-off], e.Offset+off, e, off) {
		return dest[:end-off], nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err // interrupted: no fetch for nobody
	}
	first, last := f.ix.FramesFor(e.Offset+off, end-off)
	frames, err := f.fetch.frames(ctx, first, last)
	if err != nil {
		return nil, err
	}
	n := 0
	for k, data := range frames {
		fr := &f.ix.Frames[first+k]
		lo := max(e.Offset+off-fr.UOffset, 0)
		hi := min(e.Offset+end-fr.UOffset, fr.USize)
		n += copy(dest[n:], data[lo:hi])
	}
	return dest[:n], nil
}

// readPages records a read of bytes [off, off+len(dest)) of the
// uncompressed stream and fills dest from the source's pages if it holds
// them (PageSource), waiting at most Options.FetchTimeout for them.
// (The read is of file e at fileOff.)
func (f *FS) readPages(ctx context.Context, dest []byte, off int64, e *layerindex.Entry, fileOff int64) bool {
	f.fetch.notePages(off, int64(len(dest)))
	ps, ok := f.src().(PageSource)
	if !ok || len(dest) == 0 {
		return false
	}
	if !ps.CoversPages(off, int64(len(dest))) {
		if f.log.Enabled(ctx, slog.LevelDebug) && time.Now().UnixNano() <= f.profiledUntil.Load() {
			f.log.Debug("layerfs: read not in the start-up pages", "path", e.Path, "offset", fileOff, "length", len(dest))
		}
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, f.opts.FetchTimeout)
	defer cancel()
	if !ps.ReadPages(ctx, dest, off) {
		return false
	}
	first, last := f.ix.FramesFor(off, int64(len(dest)))
	f.fetch.mu.Lock()
	f.fetch.noteFrames(first, last)
	f.fetch.mu.Unlock()
	f.st.pageReads.Add(1)
	return true
}

// src returns the FS's source.
func (f *FS) src() Source { return f.fetch.src }

// errno converts an error of a read to what the caller sees: EINTR when
// the request was interrupted, EIO for everything else (a source that
// keeps failing, frames that fail verification).
func (f *FS) errno(ctx context.Context, path string, err error) syscall.Errno {
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return syscall.EINTR
	}
	f.log.Error("layerfs: read failed", "path", path, "err", err)
	return syscall.EIO
}

// A servedFile is a file whose reads this process serves from the frames.
type servedFile struct {
	n    *node
	next atomic.Int64 // offset following the last read, to detect sequential reads
}

func (h *servedFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f, e := h.n.fs, h.n.entry()
	if errno := f.refuse(); errno != 0 {
		return nil, errno
	}
	if c := f.opts.Completer; c != nil {
		// From its start to its end (a fetch may take long), a read keeps
		// the node from being quiet.
		c.Busy()
		defer c.Busy()
	}
	b, err := f.readAt(ctx, e, dest, off)
	if err != nil {
		return nil, f.errno(ctx, e.Path, err)
	}
	f.st.servedReads.Add(1)
	f.st.servedBytes.Add(int64(len(b)))
	if off == 0 {
		f.program(h.n.i, b)
	}
	end := off + int64(len(b))
	if prev := h.next.Swap(end); prev == off && off > 0 && f.opts.Readahead > 0 && end < e.Size && time.Now().UnixNano() > f.profiledUntil.Load() {
		// Sequential: prefetch the next frames of this file.
		_, last := f.ix.FramesFor(e.Offset+off, int64(len(b)))
		_, fileLast := f.ix.FramesFor(e.Offset, e.Size)
		if until := frames.Readahead(f.ix, last, fileLast, f.opts.Readahead); until > last {
			f.fetch.prefetch(last+1, until)
		}
	}
	return fuse.ReadResultData(b), 0
}

// Release hands the file to the Completer when its last served handle
// closes: the next open can then use passthrough.
func (h *servedFile) Release(ctx context.Context) syscall.Errno {
	n := h.n
	n.mu.Lock()
	n.served--
	last := n.served == 0
	n.mu.Unlock()
	f := n.fs
	if c := f.opts.Completer; last && c != nil && f.cache != nil && !f.opts.DisablePassthrough && n.mnt.passthrough.Load() >= 0 {
		c.add(f, n.entry())
	}
	return 0
}

// A cachedFile is a file whose whole content is open in the cache. The
// kernel reads it directly (passthrough); Read serves the reads that still
// reach this process, if the kernel did not take the backing file after
// all.
type cachedFile struct {
	n *node
	f *cache.File
}

func (h *cachedFile) PassthroughFd() (int, bool) { return int(h.f.Fd()), true }

func (h *cachedFile) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if errno := h.n.fs.refuse(); errno != 0 {
		return nil, errno
	}
	k, err := h.f.ReadAt(dest, off)
	if err != nil && err != io.EOF {
		return nil, h.n.fs.errno(ctx, h.n.entry().Path, err)
	}
	h.n.fs.st.servedReads.Add(1)
	h.n.fs.st.servedBytes.Add(int64(k))
	return fuse.ReadResultData(dest[:k]), 0
}

func (h *cachedFile) Release(ctx context.Context) syscall.Errno {
	h.f.Close()
	h.n.mu.Lock()
	h.n.cached--
	h.n.mu.Unlock()
	return 0
}
