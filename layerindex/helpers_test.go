package layerindex_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"fmt"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/layerindex"
)

// ent is one tar entry to write: a header and, for regular files, a body.
type ent struct {
	hdr  tar.Header
	body []byte
}

var epoch = time.Unix(1700000000, 0)

func reg(name, body string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: epoch}, body: []byte(body)}
}

func regBytes(name string, body []byte, mode int64) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, ModTime: epoch}, body: body}
}

func dir(name string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: epoch}}
}

func symlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: epoch}}
}

func hardlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, ModTime: epoch}}
}

func withXattrs(e ent, kv ...string) ent {
	if e.hdr.PAXRecords == nil {
		e.hdr.PAXRecords = map[string]string{}
	}
	for i := 0; i < len(kv); i += 2 {
		e.hdr.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return e
}

// tarOf writes a tar; format 0 lets archive/tar choose.
func tarOf(t testing.TB, format tar.Format, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if format != 0 {
			h.Format = format
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write header %q: %v", h.Name, err)
		}
		if len(e.body) > 0 {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatalf("write %q: %v", h.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gz(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zst(t testing.TB, b []byte, opts ...zstd.EOption) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := zstd.NewWriter(&buf, opts...)
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// build runs Build and returns the index and the data blob.
func build(t testing.TB, layer []byte, opts layerindex.Options) (*layerindex.Index, []byte, error) {
	t.Helper()
	var data bytes.Buffer
	x, err := layerindex.Build(context.Background(), bytes.NewReader(layer), &data, opts)
	return x, data.Bytes(), err
}

func mustBuild(t testing.TB, layer []byte) (*layerindex.Index, []byte) {
	t.Helper()
	x, data, err := build(t, layer, layerindex.Options{})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return x, data
}

func sha(b []byte) digest.Digest {
	s := sha256.Sum256(b)
	return digest.NewDigestFromBytes(digest.SHA256, s[:])
}

func entry(t testing.TB, x *layerindex.Index, p string) *layerindex.Entry {
	t.Helper()
	i, ok := x.Lookup(p)
	if !ok {
		t.Fatalf("no entry %q; have %v", p, paths(x))
	}
	return &x.Entries[i]
}

func paths(x *layerindex.Index) []string {
	var out []string
	for _, e := range x.Entries {
		out = append(out, fmt.Sprintf("%s(%s)", e.Path, e.Type))
	}
	return out
}

// checkContent asserts that path p reads back as want from the data blob.
func checkContent(t testing.TB, x *layerindex.Index, data []byte, p string, want []byte) {
	t.Helper()
	got, err := x.ReadFile(bytes.NewReader(data), p)
	if err != nil {
		t.Fatalf("ReadFile(%q): %v", p, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("ReadFile(%q): got %d bytes, want %d (content differs)", p, len(got), len(want))
	}
}
