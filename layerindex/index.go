// Package layerindex defines strata's expanded-layer format and builds it.
//
// A registry expands each OCI or Docker layer blob once into two blobs:
//
//   - an index (media type [MediaTypeIndex]): every entry of the layer after
//     OCI semantics are applied (paths, types, modes, owners, times, link
//     targets, device numbers, xattrs, whiteouts and opaque directories), the
//     sha256 and stream position of each regular file's content, and a table
//     of frames;
//   - a data blob (media type [MediaTypeData]): the content of the layer's
//     regular files, packed in tar order into one uncompressed stream that is
//     cut into independently compressed zstd frames of about [FrameSize]
//     bytes.
//
// A node mounts a layer after fetching only the index; it reads a file by
// fetching the frames that hold it with ranged GETs ([Index.FramesFor]) and
// verifying each one ([Index.DecodeFrame]) before it serves a byte.
//
// [Build] produces both from a layer blob (gzip, zstd or plain tar), refusing
// hostile or broken input with an error that matches [ErrInvalidLayer].
// [Decode] and [Index.Encode] read and write the index's canonical binary form;
// Decode validates everything and refuses bad input with [ErrInvalidIndex].
// The byte-level format is described in docs/format.md of the strata
// repository.
package layerindex

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Version is the format version this package reads and writes.
const Version = 1

// Media types of the expanded layer.
const (
	// MediaTypeIndex is the media type of an index blob.
	MediaTypeIndex = "application/vnd.strata.layer.index.v1"
	// MediaTypeData is the media type of a data blob: a concatenation of
	// zstd frames.
	MediaTypeData = "application/vnd.strata.layer.data.v1+zstd"
	// ArtifactTypeExpansion is the artifact type of the manifest that lists
	// the expanded layers of an image and names it as its subject.
	ArtifactTypeExpansion = "application/vnd.strata.expansion.v1"
)

// Frame sizes.
const (
	// FrameSize is the uncompressed size at which the builder always cuts a
	// frame, even in the middle of a file.
	FrameSize = 128 << 10
	// FrameMinCut is the uncompressed size from which the builder cuts a
	// frame at the end of a file.
	FrameMinCut = 64 << 10
	// MaxFrameSize is the largest uncompressed frame the format allows;
	// Decode refuses indexes with larger frames.
	MaxFrameSize = 4 << 20
)

// Limits of the format, which Decode enforces whatever built the index.
const (
	MaxPathLength  = 4096  // bytes in an entry path
	MaxNameLength  = 255   // bytes in one path component
	MaxLinkLength  = 4095  // bytes in a symlink target
	MaxXattrName   = 255   // bytes in an xattr name
	MaxXattrValue  = 65536 // bytes in an xattr value
	MaxMediaLength = 255   // bytes in the media type
)

var (
	// ErrInvalidLayer is matched (errors.Is) by every error Build returns
	// because the layer itself is malformed, hostile or over a budget.
	ErrInvalidLayer = errors.New("invalid layer")
	// ErrBudget is matched, together with ErrInvalidLayer, when a layer
	// exceeds one of the budgets of Options.
	ErrBudget = errors.New("budget exceeded")
	// ErrInvalidIndex is matched by every error Decode returns for bytes
	// that are not a valid index, and by Encode for an inconsistent Index.
	ErrInvalidIndex = errors.New("invalid index")
	// ErrUnsupportedVersion is matched, together with ErrInvalidIndex, when
	// an index has a version this package does not know.
	ErrUnsupportedVersion = errors.New("unsupported index version")
	// ErrInvalidFrame is matched when frame bytes do not match the index.
	ErrInvalidFrame = errors.New("invalid frame")
)

// A LayerError reports why Build refused a layer. It matches
// ErrInvalidLayer, and ErrBudget for budget violations.
type LayerError struct {
	Name   string // the tar entry's name as recorded, if the problem is an entry's
	Reason string // what is wrong, one lowercase sentence
	Err    error  // an underlying error (a decompressor's, or ErrBudget), or nil
}

func (e *LayerError) Error() string {
	var b strings.Builder
	b.WriteString("invalid layer: ")
	if e.Name != "" {
		fmt.Fprintf(&b, "entry %q: ", e.Name)
	}
	b.WriteString(e.Reason)
	if e.Err != nil && e.Err != ErrBudget {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns ErrInvalidLayer and the underlying error.
func (e *LayerError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrInvalidLayer}
	}
	return []error{ErrInvalidLayer, e.Err}
}

// Type is the type of an entry.
type Type uint8

// Entry types. The numeric values are those of the binary format.
const (
	TypeReg      Type = 1 // regular file
	TypeDir      Type = 2 // directory
	TypeSymlink  Type = 3 // symbolic link; Linkname is the target
	TypeHardlink Type = 4 // another name of a regular file; Linkname is that file's path
	TypeChar     Type = 5 // character device
	TypeBlock    Type = 6 // block device
	TypeFIFO     Type = 7 // named pipe
	TypeWhiteout Type = 8 // hides the entry of this path in lower layers
)

var typeNames = [...]string{"", "reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout"}

func (t Type) String() string {
	if int(t) < len(typeNames) && t != 0 {
		return typeNames[t]
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Mode bits kept in Entry.Mode.
const (
	ModeSetuid = 0o4000
	ModeSetgid = 0o2000
	ModeSticky = 0o1000
	ModePerm   = 0o0777
	ModeMask   = 0o7777
)

// An Xattr is one extended attribute.
type Xattr struct {
	Name  string
	Value string // raw bytes
}

// An Entry is one file system object of the layer.
//
// Paths are clean, relative and slash-separated: no leading or trailing
// slash, no empty, "." or ".." component. The layer's root directory is the
// entry with the empty path "", always present and always first.
//
// A Hardlink entry carries only Path and Linkname: it is another name of the
// regular file Linkname, which comes earlier in Entries, and shares its
// attributes and content (its inode). A Whiteout entry carries only Path.
type Entry struct {
	Path     string
	Linkname string // Symlink: target as recorded; Hardlink: path of the Reg entry
	Digest   digest.Digest
	Xattrs   []Xattr // sorted by name, unique; nil when none
	Size     int64   // Reg: content length
	Offset   int64   // Reg: position of the content in the uncompressed data stream; 0 when Size is 0
	ModTime  int64   // seconds since the Unix epoch
	ModNsec  uint32  // nanoseconds, below 1e9
	Mode     uint32  // permission bits with setuid, setgid and sticky (ModeMask)
	UID      uint32
	GID      uint32
	Devmajor uint32 // Char, Block
	Devminor uint32 // Char, Block
	Type     Type
	Opaque   bool // Dir: lower layers' content of this directory is hidden
}

// Name returns the last component of the entry's path ("" for the root).
func (e *Entry) Name() string { return e.Path[strings.LastIndexByte(e.Path, '/')+1:] }

// Mtime returns the modification time.
func (e *Entry) Mtime() time.Time { return time.Unix(e.ModTime, int64(e.ModNsec)) }

// A Frame is one independently compressed zstd frame of the data blob.
type Frame struct {
	COffset int64         // offset of the frame in the data blob
	CSize   int64         // compressed length: bytes COffset to COffset+CSize-1 of the data blob
	UOffset int64         // offset of the frame's content in the uncompressed data stream
	USize   int64         // uncompressed length
	Digest  digest.Digest // sha256 of the CSize compressed bytes
}

// An Index describes one expanded layer.
//
// Build and Decode return indexes ready for Lookup, Children and Nlink. The
// index must not be modified afterwards.
type Index struct {
	Version   int           // format version, Version
	Layer     digest.Digest // digest of the layer blob, as pushed (compressed)
	DiffID    digest.Digest // digest of the uncompressed tar stream
	Data      digest.Digest // digest of the data blob
	MediaType string        // media type of the layer blob
	Entries   []Entry       // sorted, see Entry; Entries[0] is the root directory
	Frames    []Frame       // contiguous, in order

	DataSize   int64 // length of the data blob: sum of the frames' CSize
	StreamSize int64 // length of the uncompressed data stream: sum of USize

	tree *tree
}

// tree is the directory structure, derived from Entries.
type tree struct {
	parent   []int32 // parent entry of each entry; -1 for the root
	childIdx []int32 // children of entry i are children[childIdx[i]:childIdx[i+1]]
	children []int32
	nlink    []uint32
}

// ComparePaths orders paths the way Entries are sorted: byte-wise, except
// that '/' sorts before every other byte. The result is a depth-first
// pre-order walk in which siblings are sorted by name, and the descendants
// of a directory immediately follow it.
func ComparePaths(a, b string) int {
	n := min(len(a), len(b))
	i := 0
	for i < n && a[i] == b[i] {
		i++
	}
	if i == n {
		switch {
		case len(a) < len(b):
			return -1
		case len(a) > len(b):
			return 1
		}
		return 0
	}
	return cmpByte(a[i], b[i])
}

func cmpByte(x, y byte) int {
	if x == '/' {
		return -1
	}
	if y == '/' {
		return 1
	}
	if x < y {
		return -1
	}
	return 1
}

// Lookup returns the position in Entries of the entry with path p. Leading
// and trailing slashes are ignored, and "." names the root.
func (x *Index) Lookup(p string) (int, bool) {
	p = strings.Trim(p, "/")
	if p == "." {
		p = ""
	}
	es := x.Entries
	i := sort.Search(len(es), func(i int) bool { return ComparePaths(es[i].Path, p) >= 0 })
	if i < len(es) && es[i].Path == p {
		return i, true
	}
	return -1, false
}

// Children returns the positions of the entries directly inside directory
// i, sorted by name. The slice belongs to the index; do not modify it.
func (x *Index) Children(i int) []int32 {
	if i < 0 || i >= len(x.Entries) {
		return nil
	}
	if t := x.tree; t != nil {
		return t.children[t.childIdx[i]:t.childIdx[i+1]:t.childIdx[i+1]]
	}
	// An index that was built by hand: scan.
	dir := x.Entries[i].Path
	var out []int32
	for j := i + 1; j < len(x.Entries); j++ {
		p := x.Entries[j].Path
		if dir != "" {
			if !strings.HasPrefix(p, dir+"/") {
				break
			}
			p = p[len(dir)+1:]
		}
		if !strings.Contains(p, "/") {
			out = append(out, int32(j))
		}
	}
	return out
}

// Parent returns the position of the directory holding entry i, or -1 for
// the root.
func (x *Index) Parent(i int) int {
	if i <= 0 || i >= len(x.Entries) {
		return -1
	}
	if x.tree != nil {
		return int(x.tree.parent[i])
	}
	p := x.Entries[i].Path
	dir := ""
	if k := strings.LastIndexByte(p, '/'); k >= 0 {
		dir = p[:k]
	}
	j, _ := x.Lookup(dir)
	return j
}

// Nlink returns the link count of entry i as a file system shows it: for a
// directory 2 plus the number of its subdirectories; for a regular file 1
// plus the number of Hardlink entries naming it; 1 otherwise. A Hardlink
// entry reports the count of its file.
func (x *Index) Nlink(i int) uint32 {
	if i < 0 || i >= len(x.Entries) {
		return 0
	}
	if x.tree == nil {
		x2 := *x
		if err := x2.buildTree(nil); err != nil {
			return 1
		}
		return x2.tree.nlink[i]
	}
	return x.tree.nlink[i]
}

// FramesFor returns the inclusive range of frames that hold bytes
// [off, off+n) of the uncompressed data stream. When n <= 0 or the range
// lies outside the stream, first > last.
func (x *Index) FramesFor(off, n int64) (first, last int) {
	if n <= 0 || off < 0 || off >= x.StreamSize {
		return 0, -1
	}
	end := off + n
	if end > x.StreamSize || end < off {
		end = x.StreamSize
	}
	fs := x.Frames
	// The last frame that starts at or before off.
	first = sort.Search(len(fs), func(i int) bool { return fs[i].UOffset > off }) - 1
	last = sort.Search(len(fs), func(i int) bool { return fs[i].UOffset >= end }) - 1
	if first < 0 {
		return 0, -1
	}
	return first, last
}

// buildTree derives the directory structure from a valid, sorted Entries.
// hard lists (hardlink, target) entry pairs when the caller knows them.
func (x *Index) buildTree(hard []int32) error {
	n := len(x.Entries)
	t := &tree{
		parent:   make([]int32, n),
		childIdx: make([]int32, n+1),
		nlink:    make([]uint32, n),
	}
	stack := make([]int32, 0, 64)
	counts := t.childIdx[1:] // counts[i] = number of children of i, for now
	for i := range x.Entries {
		e := &x.Entries[i]
		switch e.Type {
		case TypeDir:
			t.nlink[i] = 2
		default:
			t.nlink[i] = 1
		}
		if i == 0 {
			if e.Path != "" || e.Type != TypeDir {
				return fmt.Errorf("%w: first entry is not the root directory", ErrInvalidIndex)
			}
			t.parent[0] = -1
			stack = append(stack, 0)
			continue
		}
		dir := ""
		if k := strings.LastIndexByte(e.Path, '/'); k >= 0 {
			dir = e.Path[:k]
		}
		for len(stack) > 0 && len(x.Entries[stack[len(stack)-1]].Path) > len(dir) {
			stack = stack[:len(stack)-1]
		}
		if len(stack) == 0 || x.Entries[stack[len(stack)-1]].Path != dir {
			return fmt.Errorf("%w: entry %q: parent directory is not listed before it", ErrInvalidIndex, e.Path)
		}
		p := stack[len(stack)-1]
		t.parent[i] = p
		counts[p]++
		if e.Type == TypeDir {
			t.nlink[p]++
			stack = append(stack, int32(i))
		}
	}
	// Prefix sums, then fill; children come out in entry order, which is
	// name order among siblings.
	var sum int32
	for i := 0; i < n; i++ {
		c := t.childIdx[i+1]
		t.childIdx[i] = sum
		sum += c
	}
	t.childIdx[n] = sum
	t.children = make([]int32, sum)
	fill := make([]int32, n)
	copy(fill, t.childIdx[:n])
	for i := 1; i < n; i++ {
		p := t.parent[i]
		t.children[fill[p]] = int32(i)
		fill[p]++
	}
	// Hardlinks: count on the target, report the target's count.
	if hard == nil {
		for i := range x.Entries {
			if x.Entries[i].Type == TypeHardlink {
				j, ok := x.Lookup(x.Entries[i].Linkname)
				if !ok || x.Entries[j].Type != TypeReg {
					return fmt.Errorf("%w: hardlink %q: target %q is not a regular file", ErrInvalidIndex, x.Entries[i].Path, x.Entries[i].Linkname)
				}
				hard = append(hard, int32(i), int32(j))
			}
		}
	}
	for k := 0; k < len(hard); k += 2 {
		t.nlink[hard[k+1]]++
	}
	for k := 0; k < len(hard); k += 2 {
		t.nlink[hard[k]] = t.nlink[hard[k+1]]
	}
	x.tree = t
	return nil
}
