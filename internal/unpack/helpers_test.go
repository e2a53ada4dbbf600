package unpack_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// entry is one tar entry: a header and, for regular files, its content.
type entry struct {
	tar.Header
	body string
	raw  []byte // written as is instead of an encoded header and body
}

var epoch = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)

func file(name, body string) entry {
	return entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(body)), ModTime: epoch}, body: body}
}

func dir(name string) entry {
	return entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: epoch}}
}

func symlink(name, target string) entry {
	return entry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: epoch}}
}

func hardlink(name, target string) entry {
	return entry{Header: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: epoch}}
}

func device(name string, typ byte, major, minor int64) entry {
	return entry{Header: tar.Header{Typeflag: typ, Name: name, Mode: 0o600, Devmajor: major, Devminor: minor, ModTime: epoch}}
}

// tarOf encodes entries as a tar stream, with its end-of-archive marker.
func tarOf(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		if e.raw != nil {
			tw.Flush()
			buf.Write(e.raw)
			continue
		}
		h := e.Header
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write header %s: %v", h.Name, err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatalf("write %s: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// rawHeader encodes e alone and rewrites its type flag, for the header
// types archive/tar refuses to write (pax 'x', unknown types).
func rawHeader(t testing.TB, e entry, typeflag byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	h := e.Header
	h.Typeflag = tar.TypeReg
	h.Size = int64(len(e.body))
	h.Format = tar.FormatUSTAR
	if err := tw.WriteHeader(&h); err != nil {
		t.Fatal(err)
	}
	tw.Write([]byte(e.body))
	tw.Flush()
	b := buf.Bytes()
	b[156] = typeflag
	copy(b[148:156], "        ")
	var sum int64
	for _, c := range b[:512] {
		sum += int64(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

// paxRecords encodes PAX extended header records.
func paxRecords(kv ...string) string {
	var s string
	for i := 0; i < len(kv); i += 2 {
		rec := " " + kv[i] + "=" + kv[i+1] + "\n"
		n := len(rec) + 1 // the length counts its own digits
		for len(fmt.Sprint(n))+len(rec) != n {
			n = len(fmt.Sprint(n)) + len(rec)
		}
		s += fmt.Sprint(n) + rec
	}
	return s
}

func gzipOf(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zstdOf(t testing.TB, b []byte) []byte {
	t.Helper()
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer zw.Close()
	return zw.EncodeAll(b, nil)
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:8])
}

// node is what a test compares about one path of a tree.
type node struct {
	Type   string
	Mode   uint32 // permission bits with setuid, setgid, sticky
	UID    uint32
	GID    uint32
	Mtime  time.Time
	Data   string // sha256 prefix of a regular file's content
	Size   int64
	Link   string // symlink target
	Rdev   uint64
	Xattrs map[string]string
	Group  string // for hardlinked files: the first path of the inode
}

// tree records every path under root (root itself as ".") without
// following symbolic links.
func tree(t testing.TB, root string, skip ...string) map[string]node {
	t.Helper()
	out := map[string]node{}
	inodes := map[uint64][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		for _, s := range skip {
			if rel == s {
				return filepath.SkipDir
			}
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		n := node{
			Mode:  st.Mode & 0o7777,
			UID:   st.Uid,
			GID:   st.Gid,
			Mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec).UTC(),
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			n.Type = "file"
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			n.Data, n.Size = sha(b), int64(len(b))
			if st.Nlink > 1 {
				inodes[st.Ino] = append(inodes[st.Ino], rel)
			}
		case unix.S_IFDIR:
			n.Type = "dir"
		case unix.S_IFLNK:
			n.Type = "symlink"
			n.Link, _ = os.Readlink(p)
			n.Mode = 0
			if st.Nlink > 1 {
				inodes[st.Ino] = append(inodes[st.Ino], rel)
			}
		case unix.S_IFCHR:
			n.Type, n.Rdev = "char", st.Rdev
		case unix.S_IFBLK:
			n.Type, n.Rdev = "block", st.Rdev
		case unix.S_IFIFO:
			n.Type = "fifo"
		default:
			n.Type = fmt.Sprintf("mode %o", st.Mode)
		}
		n.Xattrs = xattrs(t, p)
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, paths := range inodes {
		sort.Strings(paths)
		for _, p := range paths {
			n := out[p]
			n.Group = paths[0]
			out[p] = n
		}
	}
	return out
}

func xattrs(t testing.TB, p string) map[string]string {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return nil
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	out := map[string]string{}
	for _, k := range bytes.Split(buf[:sz], []byte{0}) {
		if len(k) == 0 {
			continue
		}
		v := make([]byte, 64<<10)
		n, err := unix.Lgetxattr(p, string(k), v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, k, err)
		}
		out[string(k)] = string(v[:n])
	}
	return out
}
