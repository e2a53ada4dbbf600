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

// uvarint reads a minimally encoded unsigned LEB128 integer. The offset
// is kept in a local while reading (and stored before a failure, whose
// message gives it): storing and reloading r.off at each byte made
// Decode's hot loop much slower.
func (r *reader) uvarint() uint64 {
	s, off := r.s, r.off
	if off < len(s) {
		if c := s[off]; c < 0x80 {
			r.off = off + 1
			return uint64(c)
		}
	}
	var x uint64
	var shift uint
	for i := 0; ; i++ {
		if off >= len(s) {
			r.off = off
			r.fail("truncated")
			return 0
		}
		c := s[off]
		off++
		if c < 0x80 {
			r.off = off
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
			r.off = off
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

// end fails unless the whole input has been read.
func (r *reader) end() error {
	if r.err == nil && r.off != len(r.s) {
		r.fail("%d trailing bytes", len(r.s)-r.off)
	}
	return r.err
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
//
// It reads the input once, in the order of the format (header, frame
// table, entry table) and stops at the first error. Paths and digests are
// collected into two buffers on the way and cut into the index's strings
// at the end, when their number is known; then the directory tree is
// derived.
func Decode(b []byte) (*Index, error) {
	d := &decoder{}
	if err := d.header(b); err != nil {
		return nil, err
	}
	if err := d.frames(); err != nil {
		return nil, err
	}
	if err := d.entries(); err != nil {
		return nil, err
	}
	if err := d.r.end(); err != nil {
		return nil, err
	}
	x := d.index()
	if err := x.buildTree(d.hard); err != nil {
		return nil, err
	}
	return x, nil
}

// decoder is the state of one Decode.
type decoder struct {
	r reader
	x *Index // as far as it is read; strings are set by index

	// The raw digests of the layer, its diff ID and the data blob, read
	// before digests is sized.
	layer, diffID, data string
	// digests holds every digest of the index, hex-encoded, in the order
	// read: layer, diff ID, data, the frames', the regular files'.
	digests strings.Builder
	// paths holds every path, one after the other; lens[i] is the length
	// of entry i's. The previous entry's path is paths[prevStart:][:prevLen].
	paths              strings.Builder
	lens               []uint16
	maxPaths           int
	prevStart, prevLen int
	// hard lists pairs (hardlink entry, target entry).
	hard []int32
}

// header reads what precedes the frame table: the magic, the version (one
// other than Version fails with ErrUnsupportedVersion as well), the flags
// (none is defined, so they must be zero), the raw digests of the layer,
// its diff ID and the data blob, and the media type (printable ASCII, at
// most MaxMediaLength bytes).
func (d *decoder) header(b []byte) error {
	if len(b) < len(magic) || string(b[:len(magic)]) != magic {
		return fmt.Errorf("%w: not a strata layer index (bad magic)", ErrInvalidIndex)
	}
	d.r = reader{s: string(b), off: len(magic)}
	r := &d.r
	if v := r.uvarint(); r.err == nil && v != Version {
		return fmt.Errorf("%w: %w: %d", ErrInvalidIndex, ErrUnsupportedVersion, v)
	}
	if flags := r.uvarint(); flags != 0 {
		r.fail("unknown flags %#x", flags)
	}
	d.x = &Index{Version: Version}
	d.layer, d.diffID, d.data = r.sha256(), r.sha256(), r.sha256()
	d.x.MediaType = r.str(MaxMediaLength, "media type")
	if err := checkMediaType(d.x.MediaType); err != nil {
		r.fail("media type: %v", err)
	}
	return r.err
}

// frames reads the frame table and sizes digests. A frame holds 1 to
// MaxFrameSize uncompressed bytes and 1 to maxCSize of them compressed.
// Frames are contiguous, so their offsets, DataSize and StreamSize are
// running sums. Without frames the data blob is empty, and its digest must
// say so.
func (d *decoder) frames() error {
	r, x := &d.r, d.x
	nf := r.count(minFrameBytes, "frame")
	if r.err != nil {
		return r.err
	}
	// A regular file takes at least minEntryBytes+1+sha256.Size bytes.
	d.digests.Grow((3 + nf + (len(r.s)-r.off)/(minEntryBytes+1+sha256.Size)) * digestLen)
	writeDigest(&d.digests, d.layer)
	writeDigest(&d.digests, d.diffID)
	writeDigest(&d.digests, d.data)
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
		writeDigest(&d.digests, r.sha256())
		f.COffset, f.UOffset = coff, uoff
		coff += f.CSize
		uoff += f.USize
	}
	x.DataSize, x.StreamSize = coff, uoff
	if nf == 0 && d.data != string(emptySHA256[:]) {
		r.fail("data digest of an empty data blob is not the digest of empty content")
	}
	return r.err
}

// entries reads the entry table, which lists at least the root, and sizes
// paths within maxPaths. It stops at the first entry that fails.
func (d *decoder) entries() error {
	r := &d.r
	ne := r.count(minEntryBytes, "entry")
	if r.err == nil && ne == 0 {
		r.fail("no root entry")
	}
	if r.err != nil {
		return r.err
	}
	d.x.Entries = make([]Entry, ne)
	d.lens = make([]uint16, ne)
	d.maxPaths = maxPathBytes(len(r.s))
	d.paths.Grow(min(d.maxPaths, 2*len(r.s)))
	for i := range d.x.Entries {
		if !d.entry(i) {
			break
		}
	}
	return r.err
}

// entry reads entry i: its path, the attributes every entry has, and the
// fields of its type. The root (entry 0) is a directory. It reports whether
// the entry is valid.
func (d *decoder) entry(i int) bool {
	e := &d.x.Entries[i]
	if !d.path(i) || !d.attrs(i, e) {
		return false
	}
	if i == 0 && e.Type != TypeDir {
		d.r.fail("root entry is not a directory")
		return false
	}
	return d.fields(i, e)
}

// path reads the path of entry i, encoded as the length of the prefix it
// shares with the previous path and the rest (see order), and appends it
// to paths. A path is at most MaxPathLength bytes and all paths together
// at most maxPaths. The components not shared with the previous path are
// checked by validComponents; the shared ones were checked with it.
func (d *decoder) path(i int) bool {
	r := &d.r
	p := r.uvarint()
	suf := r.str(MaxPathLength, "path")
	if r.err != nil {
		return false
	}
	if !d.order(i, p, suf) {
		return false
	}
	n := int(p) + len(suf)
	if n > MaxPathLength {
		r.fail("entry %d: path longer than %d bytes", i, MaxPathLength)
		return false
	}
	if d.paths.Len()+n > d.maxPaths {
		r.fail("paths exceed %d bytes in all", d.maxPaths)
		return false
	}
	start := d.paths.Len()
	d.paths.WriteString(d.paths.String()[d.prevStart : d.prevStart+int(p)])
	d.paths.WriteString(suf)
	path := d.paths.String()[start:]
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
			return false
		}
	}
	d.lens[i] = uint16(n)
	d.prevStart, d.prevLen = start, n
	return true
}

// order checks the prefix length p and the rest suf of entry i's path
// against the previous path: the first path is the root's (empty), the
// shared prefix is no longer than the previous path and maximal, and the
// path sorts after the previous one by ComparePaths (so paths are unique).
func (d *decoder) order(i int, p uint64, suf string) bool {
	r := &d.r
	if p > uint64(d.prevLen) {
		r.fail("entry %d: shared prefix %d longer than the previous path", i, p)
		return false
	}
	if i == 0 {
		if suf != "" {
			r.fail("first entry is not the root")
			return false
		}
		return true
	}
	if suf == "" {
		r.fail("entry %d: paths not sorted or not unique", i)
		return false
	}
	if int(p) < d.prevLen {
		c, pc := suf[0], d.paths.String()[d.prevStart+int(p)]
		if c == pc {
			r.fail("entry %d: shared prefix not maximal", i)
			return false
		}
		if cmpByte(c, pc) < 0 {
			r.fail("entry %d: paths not sorted", i)
			return false
		}
	}
	return true
}

// attrs reads the attributes every entry has: the type, the mode (no bits
// outside ModeMask), the owner, the modification time (nanoseconds below
// 1e9) and the extended attributes (see xattrs).
func (d *decoder) attrs(i int, e *Entry) bool {
	r := &d.r
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
	d.xattrs(i, e)
	return r.err == nil
}

// xattrs reads the extended attributes of entry i: names at most
// MaxXattrName bytes, not empty, without NUL, not overlayfs's own
// (trusted.overlay.*, user.overlay.*), sorted and unique; values at most
// MaxXattrValue bytes. Without any, e.Xattrs stays nil.
func (d *decoder) xattrs(i int, e *Entry) {
	r := &d.r
	nx := r.count(minXattrBytes, "xattr")
	if nx == 0 {
		return
	}
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

// fields reads the fields of entry i's type: a regular file's content (see
// content), a directory's flags (opaque or not), a symlink's target (not
// empty, without NUL), a hardlink's target (an earlier regular file), a
// device's numbers. Hardlinks and whiteouts have no attributes: theirs are
// zero. An unknown type fails.
func (d *decoder) fields(i int, e *Entry) bool {
	r := &d.r
	switch e.Type {
	case TypeReg:
		d.content(i, e)
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
			if r.err == nil && (t >= uint64(i) || d.x.Entries[t].Type != TypeReg) {
				r.fail("entry %d: hardlink target is not an earlier regular file", i)
			}
			d.hard = append(d.hard, int32(i), int32(t))
		}
	case TypeChar, TypeBlock:
		e.Devmajor = r.uint32("device major")
		e.Devminor = r.uint32("device minor")
	case TypeFIFO:
	default:
		r.fail("entry %d: unknown type %d", i, e.Type)
	}
	return r.err == nil
}

// content reads where regular file i lies in the data stream and its
// digest. Its bytes lie within the stream (an empty file's offset is not
// encoded and is zero), and an empty file has the digest of empty content.
func (d *decoder) content(i int, e *Entry) {
	r, x := &d.r, d.x
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
	writeDigest(&d.digests, raw)
}

// index cuts the paths and digests collected while reading into the
// index's strings, names each hardlink's target, and returns the index.
func (d *decoder) index() *Index {
	x := d.x
	paths := d.paths.String()
	digests := d.digests.String()
	nextDigest := func() digest.Digest {
		dg := digest.Digest(digests[:digestLen])
		digests = digests[digestLen:]
		return dg
	}
	x.Layer, x.DiffID, x.Data = nextDigest(), nextDigest(), nextDigest()
	for i := range x.Frames {
		x.Frames[i].Digest = nextDigest()
	}
	off := 0
	for i := range x.Entries {
		e := &x.Entries[i]
		e.Path = paths[off : off+int(d.lens[i])]
		off += int(d.lens[i])
		if e.Type == TypeReg {
			e.Digest = nextDigest()
		}
	}
	for k := 0; k < len(d.hard); k += 2 {
		x.Entries[d.hard[k]].Linkname = x.Entries[d.hard[k+1]].Path
	}
	return x
}
