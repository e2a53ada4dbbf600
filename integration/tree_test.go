package integration

import (
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// node is what compareTrees checks of one file system object.
type node struct {
	Mode     fs.FileMode
	UID, GID uint32
	Size     int64
	Mtime    int64 // ns; not compared for directories whose content changed
	Link     string
	Sum      [32]byte
	Rdev     uint64
	Xattrs   string
	Ino      uint64
	Nlink    uint64
}

func xattrs(p string) string {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return ""
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		return ""
	}
	var names []string
	for _, n := range strings.Split(string(buf[:sz]), "\x00") {
		if n != "" && !strings.HasPrefix(n, "trusted.overlay.") && !strings.HasPrefix(n, "security.selinux") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		v := make([]byte, 65536)
		vs, err := unix.Lgetxattr(p, n, v)
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "%s=%x;", n, v[:vs])
	}
	return b.String()
}

// scanTree reads every object under root, with content digests if withData.
func scanTree(root string, withData bool) (map[string]node, error) {
	out := map[string]node{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		n := node{Mode: fi.Mode(), UID: st.Uid, GID: st.Gid, Mtime: st.Mtim.Nano(), Rdev: uint64(st.Rdev), Xattrs: xattrs(p), Ino: st.Ino, Nlink: uint64(st.Nlink)}
		switch {
		case fi.Mode().IsRegular():
			n.Size = fi.Size()
			if withData {
				f, err := os.Open(p)
				if err != nil {
					return err
				}
				h := sha256.New()
				_, err = io.Copy(h, f)
				f.Close()
				if err != nil {
					return fmt.Errorf("read %s: %w", rel, err)
				}
				copy(n.Sum[:], h.Sum(nil))
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			n.Link, _ = os.Readlink(p)
		}
		out[rel] = n
		return nil
	})
	return out, err
}

// compareTrees returns the differences between a reference tree and a
// mounted one: presence, type and permissions, owner, size, mtime, link
// targets, content, device numbers, xattrs and hardlink groups.
func compareTrees(want, got map[string]node) []string {
	var diffs []string
	add := func(format string, a ...any) {
		if len(diffs) < 30 {
			diffs = append(diffs, fmt.Sprintf(format, a...))
		}
	}
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			add("%s: missing", p)
			continue
		}
		if w.Mode != g.Mode {
			add("%s: mode %v, want %v", p, g.Mode, w.Mode)
		}
		if w.UID != g.UID || w.GID != g.GID {
			add("%s: owner %d:%d, want %d:%d", p, g.UID, g.GID, w.UID, w.GID)
		}
		if w.Size != g.Size || w.Sum != g.Sum {
			add("%s: content differs (size %d, want %d)", p, g.Size, w.Size)
		}
		if w.Link != g.Link {
			add("%s: link %q, want %q", p, g.Link, w.Link)
		}
		if p != "." && w.Mtime != g.Mtime && !w.Mode.IsDir() {
			add("%s: mtime %d, want %d", p, g.Mtime, w.Mtime)
		}
		if w.Mode&(fs.ModeDevice|fs.ModeCharDevice) != 0 && w.Rdev != g.Rdev {
			add("%s: rdev %x, want %x", p, g.Rdev, w.Rdev)
		}
		if w.Xattrs != g.Xattrs {
			add("%s: xattrs %q, want %q", p, g.Xattrs, w.Xattrs)
		}
		if w.Mode.IsRegular() && w.Nlink != g.Nlink {
			add("%s: nlink %d, want %d", p, g.Nlink, w.Nlink)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			add("%s: unexpected", p)
		}
	}
	// Hardlink groups: paths sharing an inode in one tree share it in the other.
	groups := func(t map[string]node) map[string]string {
		byIno := map[uint64][]string{}
		for p, n := range t {
			if n.Mode.IsRegular() && n.Nlink > 1 {
				byIno[n.Ino] = append(byIno[n.Ino], p)
			}
		}
		out := map[string]string{}
		for _, ps := range byIno {
			sort.Strings(ps)
			for _, p := range ps {
				out[p] = strings.Join(ps, ",")
			}
		}
		return out
	}
	wg, gg := groups(want), groups(got)
	for p, w := range wg {
		if gg[p] != w {
			add("%s: hardlink group %q, want %q", p, gg[p], w)
		}
	}
	sort.Strings(diffs)
	return diffs
}
