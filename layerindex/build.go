package layerindex

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"runtime"
	"sort"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Media types Build records when Options.MediaType is empty.
const (
	mediaTypeTar     = "application/vnd.oci.image.layer.v1.tar"
	mediaTypeTarGzip = "application/vnd.oci.image.layer.v1.tar+gzip"
	mediaTypeTarZstd = "application/vnd.oci.image.layer.v1.tar+zstd"
)

// Default budgets of Options.
const (
	DefaultMaxUncompressedBytes = 64 << 30
	DefaultMaxEntries           = 1_000_000
	DefaultMaxPathDepth         = 256
	DefaultMaxPathLength        = MaxPathLength
	DefaultMaxXattrSize         = MaxXattrValue
	DefaultMaxZstdWindow        = 128 << 20
	DefaultMaxMetadataBytes     = 64 << 20
)

// MaxIndexSize bounds an encoded index: Build refuses a layer whose index
// would be larger, and nodes refuse larger indexes from any source.
const MaxIndexSize = 128 << 20

// Mode of the directories Build adds for parents that the tar does not
// list; they are owned by 0:0 and have mtime 0.
const ImpliedDirMode = 0o755

// Options tune Build. The zero value gives the defaults; a budget that is
// zero or negative takes its default, and budgets above a limit of the
// format are lowered to it.
type Options struct {
	// MediaType is the media type of the layer blob as its manifest names
	// it, recorded in the index. Empty: the OCI layer media type of the
	// detected compression.
	MediaType string

	// MaxUncompressedBytes bounds both the uncompressed tar stream and the
	// data stream (they differ for sparse files).
	MaxUncompressedBytes int64
	// MaxEntries bounds the number of tar headers plus the number of
	// parent directories Build adds because the tar does not list them.
	MaxEntries int
	// MaxPathDepth bounds the number of components of a path.
	MaxPathDepth int
	// MaxPathLength bounds the length of a path in bytes, after cleaning.
	MaxPathLength int
	// MaxXattrSize bounds the length of one xattr value.
	MaxXattrSize int
	// MaxZstdWindow bounds the window a zstd-compressed layer may ask the
	// decoder for.
	MaxZstdWindow int64
	// MaxMetadataBytes bounds the metadata of the whole layer that Build
	// keeps in memory and writes into the index: the bytes of entry names,
	// link targets and xattr names and values, summed over all entries
	// (replaced ones included). With MaxEntries it bounds the memory of a
	// Build whatever the layer holds.
	MaxMetadataBytes int64
}

func (o Options) withDefaults() Options {
	def := func(v *int, d, limit int) {
		if *v <= 0 {
			*v = d
		}
		if limit > 0 && *v > limit {
			*v = limit
		}
	}
	if o.MaxUncompressedBytes <= 0 {
		o.MaxUncompressedBytes = DefaultMaxUncompressedBytes
	}
	def(&o.MaxEntries, DefaultMaxEntries, 0)
	def(&o.MaxPathDepth, DefaultMaxPathDepth, MaxPathLength/2+1)
	def(&o.MaxPathLength, DefaultMaxPathLength, MaxPathLength)
	def(&o.MaxXattrSize, DefaultMaxXattrSize, MaxXattrValue)
	if o.MaxZstdWindow <= 0 {
		o.MaxZstdWindow = DefaultMaxZstdWindow
	}
	if o.MaxMetadataBytes <= 0 {
		o.MaxMetadataBytes = DefaultMaxMetadataBytes
	}
	if o.MaxZstdWindow < zstd.MinWindowSize {
		o.MaxZstdWindow = zstd.MinWindowSize
	}
	return o
}

// A frameWriter holds the open frame's buffer; Builds reuse them.
type frameWriter struct {
	frame []byte // uncompressed content of the open frame, cap FrameSize
}

var framePool sync.Pool

func getFrameWriter() (*frameWriter, error) {
	if w, ok := framePool.Get().(*frameWriter); ok {
		w.frame = w.frame[:0]
		return w, nil
	}
	return &frameWriter{frame: make([]byte, 0, FrameSize)}, nil
}

// frameEncoder is the one encoder of the process: every Build compresses
// its frames with it, at most frameEncoders at a time. One encoder at the
// best level holds about 34 MiB of tables, so their number is bounded for
// the process, whatever the cores and the concurrent Builds. Reuse does
// not change a frame's bytes: EncodeAll resets the encoder's state, so a
// frame depends only on its own content (TestFrameStateless).
var frameEncoder = sync.OnceValues(newFrameEncoder)

// frameEncoders bounds the frames compressed at once in the process.
var frameEncoders = min(runtime.GOMAXPROCS(0), 4)

// checkMediaType applies the format's rule for the recorded media type.
func checkMediaType(s string) error {
	if len(s) > MaxMediaLength {
		return fmt.Errorf("longer than %d bytes", MaxMediaLength)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return fmt.Errorf("non-printable byte %#x", s[i])
		}
	}
	return nil
}

// newFrameEncoder returns the encoder whose settings the determinism of the
// data blob depends on (see docs/format.md).
func newFrameEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedBestCompression),
		zstd.WithEncoderConcurrency(frameEncoders),
		zstd.WithEncoderCRC(false),
		zstd.WithSingleSegment(true),
		zstd.WithZeroFrames(false),
		zstd.WithLowerEncoderMem(false),
	)
}

// Build expands a layer blob read from r: it writes the data blob to data
// and returns the index, which names the data blob's digest in Data.
//
// The compression is detected from the first bytes: gzip (also eStargz,
// which is concatenated gzip members), zstd, or a plain tar. The same input
// always gives byte-identical index and data.
//
// A malformed, hostile or too large layer fails with an error that matches
// ErrInvalidLayer (and ErrBudget for a budget), usually a *LayerError naming
// the tar entry. Errors reading r or writing data, and ctx's error, are
// returned wrapped and do not match ErrInvalidLayer: they say nothing about
// the layer. After an error, what was written to data is garbage.
func Build(ctx context.Context, r io.Reader, data io.Writer, opts Options) (*Index, error) {
	opts = opts.withDefaults()
	if err := checkMediaType(opts.MediaType); err != nil {
		return nil, fmt.Errorf("build: option MediaType: %w", err)
	}
	w, err := getFrameWriter()
	if err != nil {
		return nil, err
	}
	defer framePool.Put(w)
	b := &builder{
		ctx:         ctx,
		opts:        opts,
		root:        &node{typ: TypeDir, meta: meta{mode: ImpliedDirMode}},
		out:         data,
		frameWriter: w,
		dataHash:    sha256.New(),
		workers:     make(chan struct{}, frameEncoders),
	}
	b.src = &srcReader{ctx: ctx, r: r, h: sha256.New()}
	return b.run()
}

// srcReader hashes the layer blob and remembers the errors of the caller's
// reader, which are not the layer's fault.
type srcReader struct {
	ctx context.Context
	r   io.Reader
	h   hash.Hash
	err error
}

func (s *srcReader) Read(p []byte) (int, error) {
	if err := s.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := s.r.Read(p)
	s.h.Write(p[:n])
	if err != nil && err != io.EOF && s.err == nil {
		s.err = err
	}
	return n, err
}

// streamReader sits between the decompressor and the tar reader: it
// remembers the decompressor's errors, hashes the tar stream for the diff
// ID and enforces MaxUncompressedBytes.
type streamReader struct {
	r      io.Reader
	h      hash.Hash
	n, max int64
	err    error // the decompressor's first error other than io.EOF
	budget error
}

func (s *streamReader) Read(p []byte) (int, error) {
	if s.budget != nil {
		return 0, s.budget
	}
	n, err := s.r.Read(p)
	s.h.Write(p[:n])
	s.n += int64(n)
	if err != nil && err != io.EOF && s.err == nil {
		s.err = err
	}
	if s.n > s.max {
		s.budget = &LayerError{Reason: fmt.Sprintf("uncompressed tar stream exceeds the budget of %d bytes", s.max), Err: ErrBudget}
		return n, s.budget
	}
	return n, err
}

type meta struct {
	mode, uid, gid uint32
	nsec           uint32
	mtime          int64
	xattrs         []Xattr
}

// node is one path of the layer while it is being read.
type node struct {
	typ      Type // 0: only a whiteout names this path
	hides    bool // a whiteout or opaque marker hides the lower layers' entry
	meta     meta
	children map[string]*node
	ino      *inode // TypeReg: the file this name refers to (shared by hardlinks)
	link     string // TypeSymlink
	major    uint32
	minor    uint32
}

type inode struct {
	meta    meta
	size    int64
	offset  int64
	digest  digest.Digest
	primary int // entry index of the Reg entry once emitted, else -1
}

type builder struct {
	ctx     context.Context
	opts    Options
	src     *srcReader
	stream  *streamReader
	format  string // "gzip", "zstd", "tar"
	root    *node
	entries int
	meta    int64 // metadata bytes so far (Options.MaxMetadataBytes)

	out io.Writer
	*frameWriter
	frames   []Frame
	coff     int64
	uoff     int64
	dataHash hash.Hash

	// Frames are compressed concurrently (flush), and written out in
	// order (writeFrame).
	pending []*compressJob
	workers chan struct{}
	free    [][]byte
}

// A compressJob is one frame being compressed.
type compressJob struct {
	in, out []byte
	uoff    int64
	done    chan struct{}
}

func (b *builder) run() (*Index, error) {
	br := bufio.NewReaderSize(b.src, 64<<10)
	format, decomp, err := Decompress(br, b.opts.MaxZstdWindow)
	b.format = format
	if err != nil {
		return nil, b.fail(err, "", "reading the "+format+" header")
	}
	defer decomp.Close()
	mediaType := map[string]string{FormatGzip: mediaTypeTarGzip, FormatZstd: mediaTypeTarZstd, FormatTar: mediaTypeTar}[format]
	if b.opts.MediaType != "" {
		mediaType = b.opts.MediaType
	}
	b.stream = &streamReader{r: decomp, h: sha256.New(), max: b.opts.MaxUncompressedBytes}
	tr := tar.NewReader(b.stream)
	for {
		if err := b.ctx.Err(); err != nil {
			return nil, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // we judge paths ourselves
		}
		if err == io.EOF {
			if b.stream.n%512 != 0 {
				return nil, &LayerError{Reason: "truncated tar: the stream ends inside a 512-byte block"}
			}
			break
		}
		if err != nil {
			return nil, b.fail(err, "", "reading a tar header")
		}
		if err := b.add(hdr, tr); err != nil {
			return nil, err
		}
	}
	// The diff ID covers the whole uncompressed stream, padding after the
	// end-of-archive marker included; the layer digest covers every byte.
	if _, err := io.Copy(io.Discard, b.stream); err != nil {
		return nil, b.fail(err, "", "reading past the end of the archive")
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return nil, b.fail(err, "", "reading past the end of the compressed stream")
	}
	if err := b.flush(); err != nil {
		return nil, err
	}
	if err := b.drain(); err != nil {
		return nil, err
	}

	x := &Index{
		Version:    Version,
		Layer:      digest.NewDigest(digest.SHA256, b.src.h),
		DiffID:     digest.NewDigest(digest.SHA256, b.stream.h),
		Data:       digest.NewDigest(digest.SHA256, b.dataHash),
		MediaType:  mediaType,
		Entries:    b.finish(),
		Frames:     b.frames,
		DataSize:   b.coff,
		StreamSize: b.uoff,
	}
	// Encoding checks every rule of the format; the decoded index is the
	// canonical, ready-to-use one.
	enc, err := x.MarshalBinary()
	if err != nil {
		return nil, &LayerError{Reason: "the expanded index breaks a limit of the format", Err: err}
	}
	if len(enc) > MaxIndexSize {
		return nil, overBudget("", "the index would take %d bytes, more than the %d nodes accept", len(enc), MaxIndexSize)
	}
	return Decode(enc)
}

// fail turns an error met while reading the layer into the error Build
// returns.
func (b *builder) fail(err error, name, what string) error {
	if cerr := b.ctx.Err(); cerr != nil {
		return cerr
	}
	if b.src.err != nil {
		return fmt.Errorf("read layer: %w", b.src.err)
	}
	if b.stream != nil && b.stream.budget != nil {
		return b.stream.budget
	}
	var le *LayerError
	if errors.As(err, &le) {
		return err
	}
	if b.stream != nil && b.stream.err == nil && b.format != "tar" {
		// The tar looks broken, but the cause may be a corrupt compressed
		// stream that only its checksum, at its end, reveals.
		io.Copy(io.Discard, b.stream)
		if b.src.err != nil {
			return fmt.Errorf("read layer: %w", b.src.err)
		}
		if b.stream.budget != nil {
			return b.stream.budget
		}
	}
	switch {
	case b.stream == nil:
		// The decompressor failed before the tar stream began.
	case b.stream.err != nil:
		err = b.stream.err
	default:
		// The decompressor is fine: the tar itself is bad.
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return &LayerError{Name: name, Reason: what + ": truncated tar", Err: err}
		}
		return &LayerError{Name: name, Reason: what + ": corrupt tar", Err: err}
	}
	if errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded) {
		return &LayerError{Name: name, Reason: fmt.Sprintf("zstd window exceeds the budget of %d bytes", b.opts.MaxZstdWindow), Err: fmt.Errorf("%w: %w", ErrBudget, err)}
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return &LayerError{Name: name, Reason: fmt.Sprintf("%s: truncated %s stream", what, b.format), Err: err}
	}
	return &LayerError{Name: name, Reason: fmt.Sprintf("%s: corrupt %s stream", what, b.format), Err: err}
}

func refuse(name, format string, args ...any) error {
	return &LayerError{Name: name, Reason: fmt.Sprintf(format, args...)}
}

func overBudget(name, format string, args ...any) error {
	return &LayerError{Name: name, Reason: fmt.Sprintf(format, args...), Err: ErrBudget}
}

// splitPath cleans a tar entry name into its components: leading slashes
// are dropped (as Docker and containerd do), empty and "." components are
// dropped, and a ".." component is refused.
func (b *builder) splitPath(name, raw, what string) ([]string, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return nil, refuse(raw, "%s contains a NUL byte", what)
	}
	var comps []string
	length := -1
	for c := range strings.SplitSeq(name, "/") {
		switch c {
		case "", ".":
			continue
		case "..":
			return nil, refuse(raw, "%s has a \"..\" component that could resolve outside the layer root", what)
		}
		if len(c) > MaxNameLength {
			return nil, refuse(raw, "%s has a component longer than %d bytes", what, MaxNameLength)
		}
		length += len(c) + 1
		comps = append(comps, c)
		if len(comps) > b.opts.MaxPathDepth {
			return nil, overBudget(raw, "%s deeper than the budget of %d components", what, b.opts.MaxPathDepth)
		}
		if length > b.opts.MaxPathLength {
			return nil, overBudget(raw, "%s longer than the budget of %d bytes", what, b.opts.MaxPathLength)
		}
	}
	return comps, nil
}

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
)

func (b *builder) countEntry(name string) error {
	b.entries++
	if b.entries > b.opts.MaxEntries {
		return overBudget(name, "more entries than the budget of %d", b.opts.MaxEntries)
	}
	return nil
}

// countMeta adds n bytes of metadata of entry name to the budget.
func (b *builder) countMeta(name string, n int) error {
	b.meta += int64(n)
	if b.meta > b.opts.MaxMetadataBytes {
		return overBudget(name, "names, link targets and xattrs exceed the metadata budget of %d bytes", b.opts.MaxMetadataBytes)
	}
	return nil
}

func (b *builder) metaOf(hdr *tar.Header) (meta, error) {
	m := meta{mode: uint32(hdr.Mode & ModeMask)}
	if hdr.Uid < 0 || int64(hdr.Uid) > math.MaxUint32 || hdr.Gid < 0 || int64(hdr.Gid) > math.MaxUint32 {
		return m, refuse(hdr.Name, "uid %d or gid %d out of range", hdr.Uid, hdr.Gid)
	}
	m.uid, m.gid = uint32(hdr.Uid), uint32(hdr.Gid)
	m.mtime = hdr.ModTime.Unix()
	m.nsec = uint32(hdr.ModTime.Nanosecond())
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || isOverlayXattr(name) {
			continue
		}
		if name == "" || len(name) > MaxXattrName || strings.IndexByte(name, 0) >= 0 {
			return m, refuse(hdr.Name, "invalid xattr name %q", name)
		}
		if len(v) > b.opts.MaxXattrSize {
			return m, overBudget(hdr.Name, "xattr %q of %d bytes exceeds the budget of %d", name, len(v), b.opts.MaxXattrSize)
		}
		if err := b.countMeta(hdr.Name, len(name)+len(v)); err != nil {
			return m, err
		}
		m.xattrs = append(m.xattrs, Xattr{Name: name, Value: v})
	}
	sort.Slice(m.xattrs, func(i, j int) bool { return m.xattrs[i].Name < m.xattrs[j].Name })
	return m, nil
}

// dir returns the directory at comps, adding implied directories. It
// refuses a path through a symlink or a non-directory of this layer.
func (b *builder) dir(comps []string, raw string) (*node, error) {
	cur := b.root
	for i, c := range comps {
		n := cur.children[c]
		switch {
		case n == nil:
			if err := b.countEntry(raw); err != nil {
				return nil, err
			}
			n = &node{typ: TypeDir, meta: meta{mode: ImpliedDirMode}}
			if cur.children == nil {
				cur.children = make(map[string]*node)
			}
			cur.children[c] = n
		case n.typ == 0: // named by a whiteout only: now a new, opaque directory
			if err := b.countEntry(raw); err != nil {
				return nil, err
			}
			n.typ, n.meta = TypeDir, meta{mode: ImpliedDirMode}
		case n.typ == TypeDir:
		case n.typ == TypeSymlink:
			return nil, refuse(raw, "parent %q is a symlink in this layer", strings.Join(comps[:i+1], "/"))
		default:
			return nil, refuse(raw, "parent %q is not a directory", strings.Join(comps[:i+1], "/"))
		}
		cur = n
	}
	return cur, nil
}

// lookup finds the node at comps without changing the tree.
func (b *builder) lookup(comps []string) *node {
	cur := b.root
	for _, c := range comps {
		if cur.typ != TypeDir {
			return nil
		}
		cur = cur.children[c]
		if cur == nil {
			return nil
		}
	}
	return cur
}

func (b *builder) add(hdr *tar.Header, tr io.Reader) error {
	raw := hdr.Name
	if err := b.countEntry(raw); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // global PAX records do not apply to layers
	}
	comps, err := b.splitPath(hdr.Name, raw, "path")
	if err != nil {
		return err
	}
	if err := b.countMeta(raw, len(hdr.Name)+len(hdr.Linkname)); err != nil {
		return err
	}

	// Whiteouts, by name whatever their type.
	for i, c := range comps {
		if !strings.HasPrefix(c, whiteoutPrefix) {
			continue
		}
		last := i == len(comps)-1
		switch {
		case last && c == whiteoutOpaque:
			parent, err := b.dir(comps[:i], raw)
			if err != nil {
				return err
			}
			parent.hides = true
			return nil
		case strings.HasPrefix(c, whiteoutMeta):
			return nil // AUFS metadata (.wh..wh.plnk and the like): ignored
		case !last:
			return refuse(raw, "path goes through the whiteout %q", c)
		}
		target := c[len(whiteoutPrefix):]
		if target == "" || target == "." || target == ".." {
			return refuse(raw, "whiteout of %q is not a name", target)
		}
		parent, err := b.dir(comps[:i], raw)
		if err != nil {
			return err
		}
		n := parent.children[target]
		if n == nil {
			n = &node{}
			if parent.children == nil {
				parent.children = make(map[string]*node)
			}
			parent.children[target] = n
		}
		n.hides = true
		return nil
	}

	m, err := b.metaOf(hdr)
	if err != nil {
		return err
	}
	if len(comps) == 0 {
		if hdr.Typeflag != tar.TypeDir {
			return refuse(raw, "the layer root must be a directory, not type %q", hdr.Typeflag)
		}
		b.root.meta = m
		return nil
	}
	parent, err := b.dir(comps[:len(comps)-1], raw)
	if err != nil {
		return err
	}
	name := comps[len(comps)-1]
	n := &node{meta: m}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont:
		ino := &inode{meta: m, primary: -1, size: hdr.Size}
		if err := b.copyContent(tr, ino, raw); err != nil {
			return err
		}
		n.typ, n.ino, n.meta = TypeReg, ino, meta{}
	case tar.TypeLink:
		if hdr.Linkname == "" {
			return refuse(raw, "hardlink with an empty target")
		}
		tcomps, err := b.splitPath(hdr.Linkname, raw, "hardlink target")
		if err != nil {
			return err
		}
		t := b.lookup(tcomps)
		switch {
		case t == nil:
			return refuse(raw, "hardlink target %q is not in the layer before it", hdr.Linkname)
		case t == parent.children[name]:
			return refuse(raw, "hardlink to itself")
		case t.typ != TypeReg:
			return refuse(raw, "hardlink target %q is not a regular file", hdr.Linkname)
		}
		n.typ, n.ino, n.meta = TypeReg, t.ino, meta{}
	case tar.TypeSymlink:
		switch {
		case hdr.Linkname == "":
			return refuse(raw, "symlink with an empty target")
		case len(hdr.Linkname) > MaxLinkLength:
			return refuse(raw, "symlink target longer than %d bytes", MaxLinkLength)
		case strings.IndexByte(hdr.Linkname, 0) >= 0:
			return refuse(raw, "symlink target contains a NUL byte")
		}
		n.typ, n.link = TypeSymlink, hdr.Linkname
	case tar.TypeChar, tar.TypeBlock:
		if hdr.Devmajor < 0 || hdr.Devmajor > math.MaxUint32 || hdr.Devminor < 0 || hdr.Devminor > math.MaxUint32 {
			return refuse(raw, "device number out of range")
		}
		n.typ = TypeChar
		if hdr.Typeflag == tar.TypeBlock {
			n.typ = TypeBlock
		}
		n.major, n.minor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	case tar.TypeFifo:
		n.typ = TypeFIFO
	case tar.TypeDir:
		n.typ = TypeDir
	default:
		return refuse(raw, "unsupported tar entry type %q", hdr.Typeflag)
	}

	// Last one wins. A directory over a directory only updates the
	// attributes; anything else replaces the old entry with its subtree.
	// Whiteouts of this layer keep applying to the lower layers.
	old := parent.children[name]
	if old != nil {
		if old.typ == TypeDir && n.typ == TypeDir {
			old.meta = n.meta
			return nil
		}
		n.hides = old.hides
	}
	if parent.children == nil {
		parent.children = make(map[string]*node)
	}
	parent.children[name] = n
	return nil
}

// copyContent appends a regular file's content to the data stream.
func (b *builder) copyContent(r io.Reader, ino *inode, raw string) error {
	size := ino.size
	if size > b.opts.MaxUncompressedBytes-b.uoff-int64(len(b.frame)) {
		return overBudget(raw, "file content exceeds the data budget of %d bytes", b.opts.MaxUncompressedBytes)
	}
	h := sha256.New()
	if size > 0 {
		ino.offset = b.uoff + int64(len(b.frame))
	}
	for remaining := size; remaining > 0; {
		n := int(min(remaining, int64(FrameSize-len(b.frame))))
		chunk := b.frame[len(b.frame) : len(b.frame)+n]
		if _, err := io.ReadFull(r, chunk); err != nil {
			return b.fail(err, raw, "reading file content")
		}
		h.Write(chunk)
		b.frame = b.frame[:len(b.frame)+n]
		remaining -= int64(n)
		if len(b.frame) == FrameSize {
			if err := b.flush(); err != nil {
				return err
			}
		}
	}
	ino.digest = digest.NewDigest(digest.SHA256, h)
	if len(b.frame) >= FrameMinCut {
		return b.flush()
	}
	return nil
}

// flush closes the open frame, if any: it starts compressing it, on one
// of the builder's workers, and writes out the frames compressed before
// it that are done, in order, keeping at most two per worker pending.
func (b *builder) flush() error {
	if len(b.frame) == 0 {
		return nil
	}
	if err := b.ctx.Err(); err != nil {
		return err
	}
	var in []byte
	if n := len(b.free); n > 0 {
		in, b.free = b.free[n-1][:0], b.free[:n-1]
	}
	j := &compressJob{in: append(in, b.frame...), uoff: b.uoff, done: make(chan struct{})}
	b.uoff += int64(len(b.frame))
	b.frame = b.frame[:0]
	enc, err := frameEncoder()
	if err != nil {
		return err
	}
	b.workers <- struct{}{}
	go func() {
		j.out = enc.EncodeAll(j.in, nil)
		<-b.workers
		close(j.done)
	}()
	b.pending = append(b.pending, j)
	for len(b.pending) > 2*cap(b.workers) {
		if err := b.writeFrame(); err != nil {
			return err
		}
	}
	return nil
}

// writeFrame waits for the oldest pending frame and writes it out.
func (b *builder) writeFrame() error {
	j := b.pending[0]
	b.pending = b.pending[1:]
	<-j.done
	sum := sha256.Sum256(j.out)
	if _, err := b.out.Write(j.out); err != nil {
		return fmt.Errorf("write data blob: %w", err)
	}
	b.dataHash.Write(j.out)
	b.frames = append(b.frames, Frame{
		COffset: b.coff,
		CSize:   int64(len(j.out)),
		UOffset: j.uoff,
		USize:   int64(len(j.in)),
		Digest:  digest.NewDigestFromBytes(digest.SHA256, sum[:]),
	})
	b.coff += int64(len(j.out))
	b.free = append(b.free, j.in)
	return nil
}

// drain writes out every pending frame.
func (b *builder) drain() error {
	for len(b.pending) > 0 {
		if err := b.writeFrame(); err != nil {
			return err
		}
	}
	return nil
}

// finish lists the tree in the order of the format.
func (b *builder) finish() []Entry {
	out := []Entry{{
		Path:    "",
		Type:    TypeDir,
		Opaque:  b.root.hides,
		Mode:    b.root.meta.mode,
		UID:     b.root.meta.uid,
		GID:     b.root.meta.gid,
		ModTime: b.root.meta.mtime,
		ModNsec: b.root.meta.nsec,
		Xattrs:  b.root.meta.xattrs,
	}}
	var walk func(dir *node, prefix string)
	walk = func(dir *node, prefix string) {
		names := make([]string, 0, len(dir.children))
		for name := range dir.children {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			n := dir.children[name]
			e := Entry{Path: prefix + name, Type: n.typ}
			m := n.meta
			switch n.typ {
			case 0:
				e.Type = TypeWhiteout
			case TypeDir:
				e.Opaque = n.hides
			case TypeReg:
				if n.ino.primary >= 0 {
					e.Type = TypeHardlink
					e.Linkname = out[n.ino.primary].Path
					break
				}
				n.ino.primary = len(out)
				m = n.ino.meta
				e.Size, e.Offset, e.Digest = n.ino.size, n.ino.offset, n.ino.digest
			case TypeSymlink:
				e.Linkname = n.link
			case TypeChar, TypeBlock:
				e.Devmajor, e.Devminor = n.major, n.minor
			}
			if e.Type != TypeWhiteout && e.Type != TypeHardlink {
				e.Mode, e.UID, e.GID = m.mode, m.uid, m.gid
				e.ModTime, e.ModNsec, e.Xattrs = m.mtime, m.nsec, m.xattrs
			}
			out = append(out, e)
			if n.typ == TypeDir {
				walk(n, e.Path+"/")
			}
		}
	}
	walk(b.root, "")
	return out
}
