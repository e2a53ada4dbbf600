package layerindex

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/opencontainers/go-digest"
)

// magic opens every index blob.
const magic = "STRATAIX"

// Minimum encoded sizes, used to bound counts before allocating.
const (
	minFrameBytes = 1 + 1 + sha256.Size
	minEntryBytes = 9 // prefix, suffix length, type, mode, uid, gid, mtime, nsec, xattr count
	minXattrBytes = 3 // name length, at least one name byte, value length
)

// maxPathBytes bounds the total length of all paths Decode materialises,
// an implementation limit that keeps prefix compression from amplifying a
// small hostile input into a large allocation.
func maxPathBytes(encoded int) int { return 64*encoded + 1<<20 }

// maxCSize is the largest compressed size the format allows for a frame of
// usize uncompressed bytes.
func maxCSize(usize int64) int64 { return usize + usize/128 + 1024 }

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

// reader reads the binary form. The first error sticks; reads after it
// return zero values.
type reader struct {
	s   string
	off int
	err error
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%w: at byte %d: %s", ErrInvalidIndex, r.off, fmt.Sprintf(format, args...))
	}
	r.off = len(r.s)
}

// uvarint reads a minimally encoded unsigned LEB128 integer.
func (r *reader) uvarint() uint64 {
	if r.off < len(r.s) {
		if c := r.s[r.off]; c < 0x80 {
			r.off++
			return uint64(c)
		}
	}
	var x uint64
	var shift uint
	for i := 0; ; i++ {
		if r.off >= len(r.s) {
			r.fail("truncated")
			return 0
		}
		c := r.s[r.off]
		r.off++
		if c < 0x80 {
			if i == 9 && c > 1 {
				r.fail("varint overflows 64 bits")
				return 0
			}
			if c == 0 && i > 0 {
				r.fail("varint is not minimally encoded")
				return 0
			}
			return x | uint64(c)<<shift
		}
		if i == 9 {
			r.fail("varint overflows 64 bits")
			return 0
		}
		x |= uint64(c&0x7f) << shift
		shift += 7
	}
}

func (r *reader) varint() int64 {
	u := r.uvarint()
	v := int64(u >> 1)
	if u&1 != 0 {
		v = ^v
	}
	return v
}

func (r *reader) uint32(what string) uint32 {
	v := r.uvarint()
	if v > math.MaxUint32 {
		r.fail("%s %d out of range", what, v)
		return 0
	}
	return uint32(v)
}

func (r *reader) int63(what string) int64 {
	v := r.uvarint()
	if v > math.MaxInt64>>1 {
		r.fail("%s %d out of range", what, v)
		return 0
	}
	return int64(v)
}

func (r *reader) byte() byte {
	if r.off >= len(r.s) {
		r.fail("truncated")
		return 0
	}
	c := r.s[r.off]
	r.off++
	return c
}

// str reads a length-prefixed string of at most max bytes.
func (r *reader) str(max int, what string) string {
	n := r.uvarint()
	if n > uint64(max) {
		r.fail("%s longer than %d bytes", what, max)
		return ""
	}
	if n > uint64(len(r.s)-r.off) {
		r.fail("truncated")
		return ""
	}
	s := r.s[r.off : r.off+int(n)]
	r.off += int(n)
	return s
}

// count reads a count of items that take at least min bytes each.
func (r *reader) count(min int, what string) int {
	n := r.uvarint()
	if n > uint64((len(r.s)-r.off)/min) {
		r.fail("%s count %d exceeds the input", what, n)
		return 0
	}
	return int(n)
}

func (r *reader) sha256() string {
	if len(r.s)-r.off < sha256.Size {
		r.fail("truncated")
		return string(emptySHA256[:])
	}
	s := r.s[r.off : r.off+sha256.Size]
	r.off += sha256.Size
	return s
}

const digestLen = 7 + 2*sha256.Size

func writeDigest(sb *strings.Builder, raw string) {
	const hexdigits = "0123456789abcdef"
	var b [digestLen]byte
	copy(b[:], "sha256:")
	for i := 0; i < len(raw) && i < sha256.Size; i++ {
		b[7+2*i], b[8+2*i] = hexdigits[raw[i]>>4], hexdigits[raw[i]&0xf]
	}
	sb.Write(b[:])
}

// validComponents checks the path components of p that start at or after
// position from (which must be the start of a component).
func validComponents(p string, from int) string {
	start := from
	for i := from; i <= len(p); i++ {
		if i < len(p) && p[i] != '/' {
			if p[i] == 0 {
				return "path contains NUL"
			}
			continue
		}
		n := i - start
		switch {
		case n == 0:
			return "path has an empty component"
		case n > MaxNameLength:
			return fmt.Sprintf("path component longer than %d bytes", MaxNameLength)
		case n == 1 && p[start] == '.':
			return `path has a "." component`
		case n == 2 && p[start] == '.' && p[start+1] == '.':
			return `path has a ".." component`
		}
		start = i + 1
	}
	return ""
}

func isOverlayXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.")
}

// Decode parses and validates the binary form of an index. Every rule of
// the format is checked (see docs/format.md); anything else, including a
// non-canonical encoding, fails with ErrInvalidIndex. Allocations are
// bounded by a small multiple of len(b).
func Decode(b []byte) (*Index, error) {
	if len(b) < len(magic) || string(b[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w: not a strata layer index (bad magic)", ErrInvalidIndex)
	}
	r := &reader{s: string(b), off: len(magic)}
	if v := r.uvarint(); r.err == nil && v != Version {
		return nil, fmt.Errorf("%w: %w: %d", ErrInvalidIndex, ErrUnsupportedVersion, v)
	}
	if flags := r.uvarint(); flags != 0 {
		r.fail("unknown flags %#x", flags)
	}
	x := &Index{Version: Version}
	layer, diffID, data := r.sha256(), r.sha256(), r.sha256()
	x.MediaType = r.str(MaxMediaLength, "media type")
	if err := checkMediaType(x.MediaType); err != nil {
		r.fail("media type: %v", err)
	}

	nf := r.count(minFrameBytes, "frame")
	if r.err != nil {
		return nil, r.err
	}
	// Digests of frames and regular files, hex-encoded into one string.
	// A regular file takes at least minEntryBytes+1+sha256.Size bytes.
	var dbuf strings.Builder
	dbuf.Grow((3 + nf + (len(r.s)-r.off)/(minEntryBytes+1+sha256.Size)) * digestLen)
	writeDigest(&dbuf, layer)
	writeDigest(&dbuf, diffID)
	writeDigest(&dbuf, data)
	if nf > 0 {
		x.Frames = make([]Frame, nf)
	}
	var coff, uoff int64
	for i := range x.Frames {
		f := &x.Frames[i]
		f.CSize = r.int63("frame size")
		f.USize = r.int63("frame size")
		if r.err == nil && (f.USize < 1 || f.USize > MaxFrameSize) {
			r.fail("frame %d: uncompressed size %d not in [1, %d]", i, f.USize, MaxFrameSize)
		}
		if r.err == nil && (f.CSize < 1 || f.CSize > maxCSize(f.USize)) {
			r.fail("frame %d: compressed size %d out of range", i, f.CSize)
		}
		writeDigest(&dbuf, r.sha256())
		f.COffset, f.UOffset = coff, uoff
		coff += f.CSize
		uoff += f.USize
	}
	x.DataSize, x.StreamSize = coff, uoff
	if nf == 0 && data != string(emptySHA256[:]) {
		r.fail("data digest of an empty data blob is not the digest of empty content")
	}

	ne := r.count(minEntryBytes, "entry")
	if r.err == nil && ne == 0 {
		r.fail("no root entry")
	}
	if r.err != nil {
		return nil, r.err
	}
	x.Entries = make([]Entry, ne)
	lens := make([]uint16, ne)
	var hard []int32 // pairs: hardlink entry, target entry
	maxPaths := maxPathBytes(len(b))
	var pbuf strings.Builder // all paths, one after the other
	pbuf.Grow(min(maxPaths, 2*len(b)))
	prevStart, prevLen := 0, 0
	for i := range x.Entries {
		e := &x.Entries[i]
		p := r.uvarint()
		suf := r.str(MaxPathLength, "path")
		if r.err != nil {
			break
		}
		if p > uint64(prevLen) {
			r.fail("entry %d: shared prefix %d longer than the previous path", i, p)
			break
		}
		if i == 0 {
			if suf != "" {
				r.fail("first entry is not the root")
				break
			}
		} else {
			if suf == "" {
				r.fail("entry %d: paths not sorted or not unique", i)
				break
			}
			if int(p) < prevLen {
				c, pc := suf[0], pbuf.String()[prevStart+int(p)]
				if c == pc {
					r.fail("entry %d: shared prefix not maximal", i)
					break
				}
				if cmpByte(c, pc) < 0 {
					r.fail("entry %d: paths not sorted", i)
					break
				}
			}
		}
		n := int(p) + len(suf)
		if n > MaxPathLength {
			r.fail("entry %d: path longer than %d bytes", i, MaxPathLength)
			break
		}
		if pbuf.Len()+n > maxPaths {
			r.fail("paths exceed %d bytes in all", maxPaths)
			break
		}
		start := pbuf.Len()
		pbuf.WriteString(pbuf.String()[prevStart : prevStart+int(p)])
		pbuf.WriteString(suf)
		path := pbuf.String()[start:]
		from := 0
		for k := int(p) - 1; k >= 0; k-- {
			if path[k] == '/' {
				from = k + 1
				break
			}
		}
		if i > 0 {
			if why := validComponents(path, from); why != "" {
				r.fail("entry %d: %s", i, why)
				break
			}
		}
		lens[i] = uint16(n)
		prevStart, prevLen = start, n

		e.Type = Type(r.byte())
		e.Mode = r.uint32("mode")
		if e.Mode > ModeMask {
			r.fail("entry %d: mode %#o has bits outside %#o", i, e.Mode, ModeMask)
		}
		e.UID = r.uint32("uid")
		e.GID = r.uint32("gid")
		e.ModTime = r.varint()
		e.ModNsec = r.uint32("nanoseconds")
		if e.ModNsec >= 1e9 {
			r.fail("entry %d: nanoseconds %d not below 1e9", i, e.ModNsec)
		}
		if nx := r.count(minXattrBytes, "xattr"); nx > 0 {
			e.Xattrs = make([]Xattr, nx)
			for k := range e.Xattrs {
				name := r.str(MaxXattrName, "xattr name")
				value := r.str(MaxXattrValue, "xattr value")
				switch {
				case r.err != nil:
				case name == "" || strings.IndexByte(name, 0) >= 0:
					r.fail("entry %d: invalid xattr name %q", i, name)
				case isOverlayXattr(name):
					r.fail("entry %d: overlay xattr %q", i, name)
				case k > 0 && name <= e.Xattrs[k-1].Name:
					r.fail("entry %d: xattrs not sorted or not unique", i)
				}
				e.Xattrs[k] = Xattr{Name: name, Value: value}
			}
		}
		if r.err != nil {
			break
		}
		if i == 0 && e.Type != TypeDir {
			r.fail("root entry is not a directory")
			break
		}
		switch e.Type {
		case TypeReg:
			e.Size = r.int63("size")
			if e.Size > 0 {
				e.Offset = r.int63("offset")
			}
			raw := r.sha256()
			if r.err == nil && (e.Size > x.StreamSize || e.Offset > x.StreamSize-e.Size) {
				r.fail("entry %d: content [%d, +%d) outside the data stream of %d bytes", i, e.Offset, e.Size, x.StreamSize)
			}
			if r.err == nil && e.Size == 0 && raw != string(emptySHA256[:]) {
				r.fail("entry %d: empty file with a digest that is not of empty content", i)
			}
			writeDigest(&dbuf, raw)
		case TypeDir:
			switch r.byte() {
			case 0:
			case 1:
				e.Opaque = true
			default:
				r.fail("entry %d: unknown directory flags", i)
			}
		case TypeSymlink:
			e.Linkname = r.str(MaxLinkLength, "symlink target")
			if r.err == nil && (e.Linkname == "" || strings.IndexByte(e.Linkname, 0) >= 0) {
				r.fail("entry %d: invalid symlink target", i)
			}
		case TypeHardlink, TypeWhiteout:
			if e.Mode != 0 || e.UID != 0 || e.GID != 0 || e.ModTime != 0 || e.ModNsec != 0 || e.Xattrs != nil {
				r.fail("entry %d: %s with attributes", i, e.Type)
			}
			if e.Type == TypeHardlink {
				t := r.uvarint()
				if r.err == nil && (t >= uint64(i) || x.Entries[t].Type != TypeReg) {
					r.fail("entry %d: hardlink target is not an earlier regular file", i)
				}
				hard = append(hard, int32(i), int32(t))
			}
		case TypeChar, TypeBlock:
			e.Devmajor = r.uint32("device major")
			e.Devminor = r.uint32("device minor")
		case TypeFIFO:
		default:
			r.fail("entry %d: unknown type %d", i, e.Type)
		}
		if r.err != nil {
			break
		}
	}
	if r.err == nil && r.off != len(r.s) {
		r.fail("%d trailing bytes", len(r.s)-r.off)
	}
	if r.err != nil {
		return nil, r.err
	}

	// Second pass: strings.
	paths := pbuf.String()
	digests := dbuf.String()
	nextDigest := func() digest.Digest {
		d := digest.Digest(digests[:digestLen])
		digests = digests[digestLen:]
		return d
	}
	x.Layer, x.DiffID, x.Data = nextDigest(), nextDigest(), nextDigest()
	for i := range x.Frames {
		x.Frames[i].Digest = nextDigest()
	}
	off := 0
	for i := range x.Entries {
		e := &x.Entries[i]
		e.Path = paths[off : off+int(lens[i])]
		off += int(lens[i])
		if e.Type == TypeReg {
			e.Digest = nextDigest()
		}
	}
	for k := 0; k < len(hard); k += 2 {
		x.Entries[hard[k]].Linkname = x.Entries[hard[k+1]].Path
	}
	if err := x.buildTree(hard); err != nil {
		return nil, err
	}
	return x, nil
}
