package unpack_test

import (
	"archive/tar"
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/unpack"
)

// everyEntry is a layer with every kind of entry and attribute a layer
// carries, in the PAX format so times keep their nanoseconds, and one file
// of bigSize random bytes.
func everyEntry(bigSize int) []entry {
	rnd := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, bigSize)
	for i := range big {
		big[i] = byte(rnd.UintN(256))
	}
	at := func(i int) time.Time { return epoch.Add(time.Duration(i) * 1234567891) }
	// cap_net_raw+ep, a v2 file capability.
	capNetRaw := "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	longDir := strings.Repeat("long-directory-name/", 12)

	es := []entry{
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "bin/", Mode: 0o755}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "bin/tool", Mode: 0o4755}, body: "#!/bin/sh\necho tool\n"},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "bin/ping", Mode: 0o755,
			PAXRecords: map[string]string{"SCHILY.xattr.security.capability": capNetRaw}}, body: "ping"},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "bin/tool-link", Linkname: "bin/tool"}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/hosts", Mode: 0o644}, body: "first version\n"},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/shadow", Mode: 0o640, Gid: 42}, body: "root:*:19000::::::\n"},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/empty", Mode: 0o600}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/hosts", Mode: 0o644}, body: "127.0.0.1 localhost\n"},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "etc/.wh.motd"}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "home/user/", Mode: 0o700, Uid: 1000, Gid: 1000}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "home/user/.profile", Mode: 0o644, Uid: 1000, Gid: 1000}, body: "export PS1='$ '\n"},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "srv/shared/", Mode: 0o2775, Gid: 50}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "srv/shared/big.bin", Mode: 0o644}, body: string(big)},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "srv/shared/block", Mode: 0o644}, body: strings.Repeat("b", 512)},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "usr/lib/", Mode: 0o755}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "usr/lib/libx.so.1", Mode: 0o755}, body: "\x7fELF"},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "usr/lib/libx.so", Linkname: "libx.so.1", Uid: 3, Gid: 4}},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "lib", Linkname: "usr/lib",
			PAXRecords: map[string]string{"SCHILY.xattr.trusted.sym": "on the link"}}},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "abs", Linkname: "/etc/hosts"}},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "dangling", Linkname: "nowhere/at/all"}},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "long-target", Linkname: strings.Repeat("t/", 100) + "end"}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "replaced", Mode: 0o644}, body: "a file first"},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "replaced", Linkname: "etc/hosts"}},
		{Header: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3}},
		{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/loop0", Mode: 0o660, Gid: 6, Devmajor: 7, Devminor: 0}},
		{Header: tar.Header{Typeflag: tar.TypeChar, Name: "dev/big", Mode: 0o600, Devmajor: 300, Devminor: 70000}},
		{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "run/fifo", Mode: 0o620, Uid: 1,
			PAXRecords: map[string]string{"SCHILY.xattr.trusted.fifo": "f"}}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "data/", Mode: 0o755,
			PAXRecords: map[string]string{"SCHILY.xattr.user.dirattr": "d"}}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "data/file", Mode: 0o644, PAXRecords: map[string]string{
			"SCHILY.xattr.user.comment": "hello", "SCHILY.xattr.trusted.note": "t\x00bin",
		}}, body: "data"},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "data/file-link", Linkname: "data/file"}},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "data/file-link2", Linkname: "/data/file"}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "opt/", Mode: 0o755}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "opt/.wh..wh..opq"}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "opt/keep", Mode: 0o644}, body: "keep"},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: longDir + "pax-file", Mode: 0o644}, body: "pax long name"},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: longDir + "gnu-file", Mode: 0o644, Format: tar.FormatGNU}, body: "gnu long name"},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "gnu-link", Linkname: longDir + "gnu-file", Format: tar.FormatGNU}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "bin/late", Mode: 0o755}, body: "written after bin's entry"},
	}
	for i := range es {
		h := &es[i].Header
		if h.Format == 0 {
			h.Format = tar.FormatPAX
		}
		if h.Format == tar.FormatPAX {
			h.ModTime = at(i)
		} else {
			h.ModTime = at(i).Truncate(time.Second)
		}
	}
	return es
}

// TestMatchesGNUTar extracts the same layer with GNU tar as root and with
// Layer, and compares the trees: content, mode, owner, mtime, link
// targets, hardlink groups, xattrs and device numbers. GNU tar writes
// whiteouts as ordinary .wh.* files; they are compared in their overlay
// form.
func TestMatchesGNUTar(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "tar")
	es := everyEntry(1<<20 + 17)
	layer := tarOf(t, es...)
	tmp := t.TempDir()
	gnuDir, ourDir := tmp+"/gnu", tmp+"/ours"
	os.Mkdir(gnuDir, 0o755)
	os.Mkdir(ourDir, 0o755)

	cmd := exec.Command("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", gnuDir)
	cmd.Stdin = bytes.NewReader(layer)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("GNU tar: %v\n%s", err, out)
	}
	if _, err := unpack.Layer(context.Background(), bytes.NewReader(gzipOf(t, layer)), ourDir, unpack.Options{}); err != nil {
		t.Fatal(err)
	}

	want := overlayForm(tree(t, gnuDir))
	got := tree(t, ourDir)
	explicit := map[string]time.Time{}
	for _, e := range es {
		explicit[path.Clean(e.Name)] = e.ModTime
	}
	for p, n := range got {
		_, ok := explicit[p]
		if n.Type == "char" && n.Rdev == 0 || n.Type == "dir" && !ok {
			// Whiteouts carry no times; implicit parents have the time of
			// their creation.
			n.Mtime = time.Time{}
			got[p] = n
			w := want[p]
			w.Mtime = time.Time{}
			want[p] = w
		}
	}
	// GNU tar applies a directory's metadata when extraction leaves it, so
	// bin/late, coming later, bumps bin's mtime. Layer applies it at the end.
	w := want["bin"]
	w.Mtime = explicit["bin"]
	want["bin"] = w
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Layer differs from GNU tar (-gnu +ours):\n%s", diff)
	}
	if len(got) < 40 {
		t.Errorf("only %d paths compared", len(got))
	}
}

// overlayForm turns GNU tar's .wh.* files into overlay whiteouts and
// opaque directories.
func overlayForm(in map[string]node) map[string]node {
	out := map[string]node{}
	opaque := map[string]bool{}
	for p, n := range in {
		dir, base := path.Split(p)
		switch {
		case base == ".wh..wh..opq":
			opaque[path.Clean(dir)] = true
		case strings.HasPrefix(base, ".wh."):
			out[dir+strings.TrimPrefix(base, ".wh.")] = node{Type: "char", UID: n.UID, GID: n.GID}
		default:
			out[p] = n
		}
	}
	for d := range opaque {
		n := out[d]
		if n.Xattrs == nil {
			n.Xattrs = map[string]string{}
		}
		n.Xattrs["trusted.overlay.opaque"] = "y"
		out[d] = n
	}
	return out
}
