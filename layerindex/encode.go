package layerindex

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"strings"

	"github.com/opencontainers/go-digest"
)

// magic opens every index blob.
const magic = "STRATAIX"

var (
	emptySHA256 = sha256.Sum256(nil)
	emptyDigest = digest.NewDigestFromBytes(digest.SHA256, emptySHA256[:])
)

// Encode writes the canonical binary form of the index to w.
func (x *Index) Encode(w io.Writer) error {
	b, err := x.MarshalBinary()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// MarshalBinary returns the canonical binary form of the index. It fails
// with ErrInvalidIndex when the index breaks a rule of the format, or holds
// a value the format cannot represent (a field set that its entry type does
// not have, say): decoding the result always gives back an equal Index.
func (x *Index) MarshalBinary() ([]byte, error) {
	b, err := x.appendBinary(nil)
	if err != nil {
		return nil, err
	}
	y, err := Decode(b)
	if err != nil {
		return nil, err
	}
	if err := sameIndex(x, y); err != nil {
		return nil, err
	}
	return b, nil
}

// UnmarshalBinary decodes b into x, see Decode.
func (x *Index) UnmarshalBinary(b []byte) error {
	y, err := Decode(b)
	if err != nil {
		return err
	}
	*x = *y
	return nil
}

func rawSHA256(d digest.Digest) ([sha256.Size]byte, error) {
	var out [sha256.Size]byte
	s := string(d)
	if !strings.HasPrefix(s, "sha256:") || len(s) != 7+2*sha256.Size {
		return out, fmt.Errorf("%w: digest %q is not a sha256 digest", ErrInvalidIndex, s)
	}
	if _, err := hex.Decode(out[:], []byte(s[7:])); err != nil {
		return out, fmt.Errorf("%w: digest %q: %v", ErrInvalidIndex, s, err)
	}
	return out, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func (x *Index) appendBinary(b []byte) ([]byte, error) {
	if x.Version != Version {
		return nil, fmt.Errorf("%w: %w: %d", ErrInvalidIndex, ErrUnsupportedVersion, x.Version)
	}
	b = append(b, magic...)
	b = binary.AppendUvarint(b, Version)
	b = binary.AppendUvarint(b, 0) // flags
	for _, d := range []digest.Digest{x.Layer, x.DiffID, x.Data} {
		raw, err := rawSHA256(d)
		if err != nil {
			return nil, err
		}
		b = append(b, raw[:]...)
	}
	b = appendString(b, x.MediaType)
	b = binary.AppendUvarint(b, uint64(len(x.Frames)))
	for _, f := range x.Frames {
		if f.CSize < 0 || f.USize < 0 {
			return nil, fmt.Errorf("%w: negative frame size", ErrInvalidIndex)
		}
		b = binary.AppendUvarint(b, uint64(f.CSize))
		b = binary.AppendUvarint(b, uint64(f.USize))
		raw, err := rawSHA256(f.Digest)
		if err != nil {
			return nil, err
		}
		b = append(b, raw[:]...)
	}
	b = binary.AppendUvarint(b, uint64(len(x.Entries)))
	prev := ""
	for i := range x.Entries {
		e := &x.Entries[i]
		p := 0
		for p < len(prev) && p < len(e.Path) && prev[p] == e.Path[p] {
			p++
		}
		b = binary.AppendUvarint(b, uint64(p))
		b = appendString(b, e.Path[p:])
		prev = e.Path
		b = append(b, byte(e.Type))
		b = binary.AppendUvarint(b, uint64(e.Mode))
		b = binary.AppendUvarint(b, uint64(e.UID))
		b = binary.AppendUvarint(b, uint64(e.GID))
		b = binary.AppendVarint(b, e.ModTime)
		b = binary.AppendUvarint(b, uint64(e.ModNsec))
		b = binary.AppendUvarint(b, uint64(len(e.Xattrs)))
		for _, xa := range e.Xattrs {
			b = appendString(b, xa.Name)
			b = appendString(b, xa.Value)
		}
		switch e.Type {
		case TypeReg:
			if e.Size < 0 || e.Offset < 0 {
				return nil, fmt.Errorf("%w: entry %q: negative size or offset", ErrInvalidIndex, e.Path)
			}
			b = binary.AppendUvarint(b, uint64(e.Size))
			if e.Size > 0 {
				b = binary.AppendUvarint(b, uint64(e.Offset))
			}
			raw, err := rawSHA256(e.Digest)
			if err != nil {
				return nil, fmt.Errorf("entry %q: %w", e.Path, err)
			}
			b = append(b, raw[:]...)
		case TypeDir:
			if e.Opaque {
				b = append(b, 1)
			} else {
				b = append(b, 0)
			}
		case TypeSymlink:
			b = appendString(b, e.Linkname)
		case TypeHardlink:
			j, ok := x.Lookup(e.Linkname)
			if !ok || e.Linkname != x.Entries[j].Path {
				return nil, fmt.Errorf("%w: hardlink %q: target %q is not an entry", ErrInvalidIndex, e.Path, e.Linkname)
			}
			b = binary.AppendUvarint(b, uint64(j))
		case TypeChar, TypeBlock:
			b = binary.AppendUvarint(b, uint64(e.Devmajor))
			b = binary.AppendUvarint(b, uint64(e.Devminor))
		case TypeFIFO, TypeWhiteout:
		default:
			return nil, fmt.Errorf("%w: entry %q: unknown type %d", ErrInvalidIndex, e.Path, e.Type)
		}
	}
	return b, nil
}

// sameIndex reports, as an ErrInvalidIndex, the first difference between x
// and its decoded encoding y.
func sameIndex(x, y *Index) error {
	bad := func(what string) error {
		return fmt.Errorf("%w: %s is not representable or not canonical", ErrInvalidIndex, what)
	}
	switch {
	case x.Layer != y.Layer:
		return bad("layer digest")
	case x.DiffID != y.DiffID:
		return bad("diff ID")
	case x.Data != y.Data:
		return bad("data digest")
	case x.MediaType != y.MediaType:
		return bad("media type")
	case x.DataSize != y.DataSize:
		return bad("data size (sum of the frames' compressed sizes)")
	case x.StreamSize != y.StreamSize:
		return bad("stream size (sum of the frames' uncompressed sizes)")
	case len(x.Frames) != len(y.Frames) || len(x.Entries) != len(y.Entries):
		return bad("table length")
	}
	for i := range x.Frames {
		if x.Frames[i] != y.Frames[i] {
			return bad(fmt.Sprintf("frame %d (offsets must be contiguous)", i))
		}
	}
	for i := range x.Entries {
		a, b := &x.Entries[i], &y.Entries[i]
		var field string
		switch {
		case a.Path != b.Path:
			field = "path"
		case a.Type != b.Type:
			field = "type"
		case a.Linkname != b.Linkname:
			field = "linkname"
		case a.Digest != b.Digest:
			field = "digest"
		case a.Size != b.Size:
			field = "size"
		case a.Offset != b.Offset:
			field = "offset"
		case a.ModTime != b.ModTime || a.ModNsec != b.ModNsec:
			field = "mtime"
		case a.Mode != b.Mode:
			field = "mode"
		case a.UID != b.UID || a.GID != b.GID:
			field = "owner"
		case a.Devmajor != b.Devmajor || a.Devminor != b.Devminor:
			field = "device numbers"
		case a.Opaque != b.Opaque:
			field = "opaque"
		case len(a.Xattrs) != len(b.Xattrs):
			field = "xattrs"
		}
		if field == "" {
			for k := range a.Xattrs {
				if a.Xattrs[k] != b.Xattrs[k] {
					field = "xattrs"
				}
			}
		}
		if field != "" {
			return bad(fmt.Sprintf("entry %d %q: %s", i, a.Path, field))
		}
	}
	return nil
}
