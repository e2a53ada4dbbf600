package unpack

import (
	"archive/tar"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh." // aufs bookkeeping, e.g. .wh..wh.plnk
	opaqueMarker   = ".wh..wh..opq"

	overlayOpaque = "trusted.overlay.opaque"
	paxXattr      = "SCHILY.xattr."
)

// extractor writes entries beneath one directory. Every path is resolved
// from root with openat2(RESOLVE_IN_ROOT), and every change is made with an
// *at system call relative to the resolved parent, never following the
// last component.
type extractor struct {
	root     int
	log      *slog.Logger
	maxBytes int64
	written  int64
	maxNodes int // entries plus the parent directories made for them
	nodes    int
	chown    bool
	dirs     map[string]dirMeta // explicit directories, applied by finish
	buf      []byte
}

type dirMeta struct {
	hdr      *tar.Header
	dev, ino uint64
}

func newExtractor(dir string, opts Options) (*extractor, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	x := &extractor{
		root:     fd,
		log:      opts.Logger,
		maxBytes: opts.MaxBytes,
		maxNodes: opts.MaxEntries,
		chown:    os.Geteuid() == 0,
		dirs:     make(map[string]dirMeta),
	}
	probe, err := x.resolve(".", 0)
	if err != nil {
		unix.Close(fd)
		if err == unix.ENOSYS {
			return nil, fmt.Errorf("unpack needs openat2 (Linux 5.6 or later): %w", err)
		}
		return nil, &os.PathError{Op: "openat2", Path: dir, Err: err}
	}
	unix.Close(probe)
	return x, nil
}

func (x *extractor) close() { unix.Close(x.root) }

// cleanPath turns a tar name into a path relative to the layer root: a
// leading "/" is dropped, the path is cleaned, and a path climbing above
// the root is refused. The root itself is ".".
func cleanPath(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("%w: empty name", ErrInvalid)
	}
	p := path.Clean(strings.TrimLeft(name, "/"))
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", fmt.Errorf("%w: path escapes the layer", ErrInvalid)
	}
	return p, nil
}

// resolve opens directory p, following symbolic links inside the layer.
// With flags 0 the result is an O_PATH descriptor.
func (x *extractor) resolve(p string, flags uint64) (int, error) {
	if flags == 0 {
		flags = unix.O_PATH
	}
	how := unix.OpenHow{
		Flags:   flags | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(x.root, p, &how)
		if (err == unix.EAGAIN || err == unix.EINTR) && i < 64 {
			continue // a concurrent rename; the kernel asks to retry
		}
		return fd, err
	}
}

// mkdirAll resolves directory p, creating missing directories (mode 0755)
// as tar does for entries whose parents are not in the archive.
func (x *extractor) mkdirAll(p string) (int, error) {
	fd, err := x.resolve(p, 0)
	if err != unix.ENOENT {
		if err != nil {
			return -1, fmt.Errorf("parent %s: %w", p, err)
		}
		return fd, nil
	}
	cur, err := x.resolve(".", 0)
	if err != nil {
		return -1, err
	}
	comps := strings.Split(p, "/")
	for i, c := range comps {
		prefix := strings.Join(comps[:i+1], "/")
		next, err := x.resolve(prefix, 0)
		if err == unix.ENOENT {
			if err := x.count(); err != nil {
				unix.Close(cur)
				return -1, err
			}
			if err := unix.Mkdirat(cur, c, 0o755); err != nil && err != unix.EEXIST {
				unix.Close(cur)
				return -1, fmt.Errorf("create parent %s: %w", prefix, err)
			}
			next, err = x.resolve(prefix, 0)
		}
		unix.Close(cur)
		if err != nil {
			return -1, fmt.Errorf("parent %s: %w", prefix, err)
		}
		cur = next
	}
	return cur, nil
}

// count charges one more file system node to the entry budget, which
// also covers the parent directories a deep name makes.
func (x *extractor) count() error {
	x.nodes++
	if x.nodes > x.maxNodes {
		return fmt.Errorf("%w: more than %d entries and parent directories", ErrTooLarge, x.maxNodes)
	}
	return nil
}

func splitPath(p string) (dir, base string) {
	dir, base = path.Split(p)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		dir = "."
	}
	return dir, base
}

func lstatAt(dirfd int, name string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	return st, err
}

func isDir(st *unix.Stat_t) bool { return st.Mode&unix.S_IFMT == unix.S_IFDIR }

func isWhiteout(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

func (x *extractor) entry(hdr *tar.Header, r io.Reader) error {
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader:
		x.log.Debug("skip global pax header")
		return nil
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont, tar.TypeDir, tar.TypeSymlink,
		tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default:
		return fmt.Errorf("%w: unsupported entry type %q", ErrInvalid, hdr.Typeflag)
	}
	if err := x.count(); err != nil {
		return err
	}
	name, err := cleanPath(hdr.Name)
	if err != nil {
		return err
	}
	if uid, gid := int64(hdr.Uid), int64(hdr.Gid); uid < 0 || gid < 0 || uid >= 1<<32-1 || gid >= 1<<32-1 {
		return fmt.Errorf("%w: owner %d:%d out of range", ErrInvalid, hdr.Uid, hdr.Gid)
	}
	if strings.HasPrefix(name, whiteoutMeta) && name != opaqueMarker {
		// aufs bookkeeping at the top (.wh..wh.plnk, .wh..wh.aufs), as docker skips it.
		x.log.Debug("skip aufs metadata entry", "entry", hdr.Name)
		return nil
	}
	if name == "." {
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("%w: the layer root can only be a directory", ErrInvalid)
		}
		x.dirs["."] = x.dirMeta(x.root, ".", hdr)
		return nil
	}
	parent, base := splitPath(name)
	if strings.HasPrefix(base, whiteoutPrefix) {
		return x.whiteout(parent, base, hdr)
	}

	// The source of a hardlink is checked before anything is removed.
	var link struct {
		dirfd int
		base  string
		st    unix.Stat_t
	}
	if hdr.Typeflag == tar.TypeLink {
		fd, b, st, err := x.linkSource(hdr.Linkname)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		link.dirfd, link.base, link.st = fd, b, st
	}

	pfd, err := x.mkdirAll(parent)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)

	replacedWhiteout := false
	if st, err := lstatAt(pfd, base); err == nil {
		switch {
		case hdr.Typeflag == tar.TypeDir && isDir(&st):
			// A directory over a directory keeps its content.
			x.dirs[name] = x.dirMeta(pfd, base, hdr)
			return x.setXattrsDir(pfd, base, hdr)
		case hdr.Typeflag == tar.TypeLink && st.Dev == link.st.Dev && st.Ino == link.st.Ino:
			return nil // already that file
		}
		replacedWhiteout = isWhiteout(&st)
		if err := removeAll(pfd, base); err != nil {
			return fmt.Errorf("replace existing entry: %w", err)
		}
	} else if err != unix.ENOENT {
		return fmt.Errorf("lstat: %w", err)
	}

	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont:
		return x.file(pfd, base, hdr, r)
	case tar.TypeDir:
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil {
			return fmt.Errorf("mkdir: %w", err)
		}
		x.dirs[name] = x.dirMeta(pfd, base, hdr)
		if replacedWhiteout {
			// The layer whites out the lower NAME and holds its own NAME.
			if err := x.setOpaque(pfd, base); err != nil {
				return err
			}
		}
		return x.setXattrsDir(pfd, base, hdr)
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
		return x.finishEntry(pfd, base, hdr, false)
	case tar.TypeLink:
		if err := unix.Linkat(link.dirfd, link.base, pfd, base, 0); err != nil {
			return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
		}
		return nil
	default: // char, block, fifo
		mode := uint32(unix.S_IFIFO)
		switch hdr.Typeflag {
		case tar.TypeChar:
			mode = unix.S_IFCHR
		case tar.TypeBlock:
			mode = unix.S_IFBLK
		}
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 1<<32-1 || hdr.Devminor > 1<<32-1 {
			return fmt.Errorf("%w: device %d:%d out of range", ErrInvalid, hdr.Devmajor, hdr.Devminor)
		}
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(pfd, base, mode|0o600, int(dev)); err != nil {
			return fmt.Errorf("mknod: %w", err)
		}
		return x.finishEntry(pfd, base, hdr, true)
	}
}

// linkSource resolves the target of a hardlink entry: a non-directory the
// layer already holds.
func (x *extractor) linkSource(linkname string) (int, string, unix.Stat_t, error) {
	var st unix.Stat_t
	target, err := cleanPath(linkname)
	if err != nil {
		return -1, "", st, fmt.Errorf("hardlink target %q: %w", linkname, err)
	}
	if target == "." {
		return -1, "", st, fmt.Errorf("%w: hardlink to the layer root", ErrInvalid)
	}
	dir, base := splitPath(target)
	fd, err := x.resolve(dir, 0)
	if err == nil {
		st, err = lstatAt(fd, base)
		if err != nil {
			unix.Close(fd)
		}
	}
	switch {
	case err == unix.ENOENT || err == unix.ENOTDIR:
		return -1, "", st, fmt.Errorf("%w: hardlink target %q is not in the layer", ErrInvalid, linkname)
	case err != nil:
		return -1, "", st, fmt.Errorf("hardlink target %q: %w", linkname, err)
	case isDir(&st):
		unix.Close(fd)
		return -1, "", st, fmt.Errorf("%w: hardlink target %q is a directory", ErrInvalid, linkname)
	}
	return fd, base, st, nil
}

// file writes a regular file. Its owner is set before its mode (chown
// clears setuid bits) and its xattrs after (chown clears file capabilities).
func (x *extractor) file(pfd int, base string, hdr *tar.Header, r io.Reader) error {
	if hdr.Size < 0 {
		return fmt.Errorf("%w: negative size", ErrInvalid)
	}
	if x.written+hdr.Size > x.maxBytes {
		return fmt.Errorf("%w: files total more than %d bytes", ErrTooLarge, x.maxBytes)
	}
	fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	if x.buf == nil {
		x.buf = make([]byte, 256<<10)
	}
	n, err := io.CopyBuffer(struct{ io.Writer }{f}, r, x.buf)
	x.written += n
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if n != hdr.Size {
		return fmt.Errorf("%w: %d bytes of content, header says %d", ErrInvalid, n, hdr.Size)
	}
	if x.chown {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("chown: %w", err)
		}
	}
	if err := unix.Fchmod(fd, uint32(hdr.Mode)&0o7777); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	if err := x.setXattrs(hdr, func(k string, v []byte) error { return unix.Fsetxattr(fd, k, v, 0) }); err != nil {
		return err
	}
	if err := futimens(fd, hdr); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// finishEntry applies owner, mode (unless a symlink), xattrs and times to
// an entry just created, without following it.
func (x *extractor) finishEntry(pfd int, base string, hdr *tar.Header, chmod bool) error {
	if x.chown {
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown: %w", err)
		}
	}
	if chmod {
		mode := uint32(hdr.Mode) & 0o7777
		err := unix.Fchmodat(pfd, base, mode, unix.AT_SYMLINK_NOFOLLOW)
		if err == unix.EOPNOTSUPP {
			// No fchmodat2 (Linux < 6.6). The entry is a device or fifo
			// this extractor just made, so following is harmless.
			err = unix.Fchmodat(pfd, base, mode, 0)
		}
		if err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
	}
	if err := x.setXattrs(hdr, func(k string, v []byte) error { return lsetxattrat(pfd, base, k, v) }); err != nil {
		return err
	}
	if err := unix.UtimesNanoAt(pfd, base, times(hdr), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

func (x *extractor) dirMeta(pfd int, base string, hdr *tar.Header) dirMeta {
	m := dirMeta{hdr: hdr}
	if st, err := lstatAt(pfd, base); err == nil {
		m.dev, m.ino = st.Dev, st.Ino
	}
	return m
}

// setXattrsDir sets a directory's xattrs right away: its owner, which
// could clear some, is applied by finish only if it differs.
func (x *extractor) setXattrsDir(pfd int, base string, hdr *tar.Header) error {
	if !hasXattrs(hdr) {
		return nil
	}
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory: %w", err)
	}
	defer unix.Close(fd)
	return x.setXattrs(hdr, func(k string, v []byte) error { return unix.Fsetxattr(fd, k, v, 0) })
}

func hasXattrs(hdr *tar.Header) bool {
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			return true
		}
	}
	return false
}

// setXattrs sets the entry's SCHILY.xattr.* records in name order. The
// overlay namespaces are dropped; user.* attributes the file system does
// not support are skipped.
func (x *extractor) setXattrs(hdr *tar.Header, set func(string, []byte) error) error {
	var keys []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		attr := strings.TrimPrefix(k, paxXattr)
		if strings.HasPrefix(attr, "trusted.overlay.") || strings.HasPrefix(attr, "user.overlay.") {
			x.log.Warn("dropping overlay xattr from layer entry", "entry", hdr.Name, "xattr", attr)
			continue
		}
		err := set(attr, []byte(hdr.PAXRecords[k]))
		if (err == unix.ENOTSUP || err == unix.EOPNOTSUPP) && strings.HasPrefix(attr, "user.") {
			x.log.Debug("file system does not support xattr", "entry", hdr.Name, "xattr", attr)
			continue
		}
		if err != nil {
			return fmt.Errorf("set xattr %s: %w", attr, err)
		}
	}
	return nil
}

// whiteout writes ".wh.NAME" or ".wh..wh..opq" in overlayfs's format.
func (x *extractor) whiteout(parent, base string, hdr *tar.Header) error {
	if base != opaqueMarker && strings.HasPrefix(base, whiteoutMeta) {
		x.log.Debug("skip aufs metadata entry", "entry", hdr.Name)
		return nil
	}
	target := strings.TrimPrefix(base, whiteoutPrefix)
	if base != opaqueMarker && (target == "" || target == "." || target == ".." || strings.Contains(target, "/")) {
		return fmt.Errorf("%w: whiteout of %q", ErrInvalid, target)
	}
	pfd, err := x.mkdirAll(parent)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if base == opaqueMarker {
		return x.setOpaque(pfd, ".")
	}
	st, err := lstatAt(pfd, target)
	switch {
	case err == nil && isDir(&st):
		// The layer's own directory stays; lower ones are hidden.
		return x.setOpaque(pfd, target)
	case err == nil:
		// The layer's own file already hides the lower ones.
		x.log.Debug("whiteout of a file the layer holds", "entry", hdr.Name)
		return nil
	case err != unix.ENOENT:
		return fmt.Errorf("lstat: %w", err)
	}
	if err := unix.Mknodat(pfd, target, unix.S_IFCHR, 0); err != nil {
		return fmt.Errorf("create whiteout: %w", err)
	}
	if x.chown {
		if err := unix.Fchownat(pfd, target, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown whiteout: %w", err)
		}
	}
	return nil
}

func (x *extractor) setOpaque(pfd int, name string) error {
	fd, err := unix.Openat(pfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Fsetxattr(fd, overlayOpaque, []byte("y"), 0); err != nil {
		return fmt.Errorf("mark directory opaque: %w", err)
	}
	return nil
}

// finish applies the directories' owners, modes and times, deepest first.
// A directory replaced since its entry (another inode at the path) is left.
func (x *extractor) finish() error {
	names := make([]string, 0, len(x.dirs))
	for n := range x.dirs {
		names = append(names, n)
	}
	depth := func(p string) int {
		if p == "." {
			return 0
		}
		return strings.Count(p, "/") + 1
	}
	sort.Slice(names, func(i, j int) bool {
		if di, dj := depth(names[i]), depth(names[j]); di != dj {
			return di > dj
		}
		return names[i] < names[j]
	})
	for _, n := range names {
		m := x.dirs[n]
		if err := x.applyDir(n, m); err != nil {
			return fmt.Errorf("entry %q: %w", m.hdr.Name, err)
		}
	}
	return nil
}

func (x *extractor) applyDir(name string, m dirMeta) error {
	fd, err := x.resolve(name, unix.O_RDONLY|unix.O_NOFOLLOW)
	if err == unix.ENOENT || err == unix.ENOTDIR || err == unix.ELOOP {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open directory: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat directory: %w", err)
	}
	if st.Dev != m.dev || st.Ino != m.ino {
		return nil
	}
	hdr := m.hdr
	if x.chown && (st.Uid != uint32(hdr.Uid) || st.Gid != uint32(hdr.Gid)) {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("chown: %w", err)
		}
	}
	if err := unix.Fchmod(fd, uint32(hdr.Mode)&0o7777); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	if err := futimens(fd, hdr); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// removeAll removes name in dirfd and, for a directory, its content,
// without following symbolic links.
func removeAll(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	if err != unix.EISDIR {
		return err
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), name)
	names, err := f.Readdirnames(-1)
	if err != nil {
		f.Close()
		return err
	}
	for _, n := range names {
		if err := removeAll(fd, n); err != nil {
			f.Close()
			return err
		}
	}
	f.Close()
	return unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
}

// times returns the entry's access and modification times. A missing
// access time takes the modification time.
func times(hdr *tar.Header) []unix.Timespec {
	ts := func(t time.Time) unix.Timespec {
		s, _ := unix.TimeToTimespec(t) // out of range only for 32-bit time_t
		return s
	}
	atime := hdr.AccessTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	return []unix.Timespec{ts(atime), ts(hdr.ModTime)}
}

func futimens(fd int, hdr *tar.Header) error {
	// utimensat(fd, NULL, ...) is futimens; an empty path needs AT_EMPTY_PATH.
	return unix.UtimesNanoAt(fd, "", times(hdr), unix.AT_EMPTY_PATH)
}
