package layerindex

import (
	"crypto/sha256"
	"fmt"
	"math"
	"strings"

	"github.com/opencontainers/go-digest"
)

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
