// Package unpack extracts an image layer blob into a directory that serves
// as an overlayfs lower layer. It is the node's fallback when a registry does
// not offer layer mounts: each layer is downloaded, unpacked into its own
// directory with [Layer], and the directories are stacked by overlayfs.
//
// A layer is untrusted input. Every path is resolved inside the layer
// directory, as if that directory were the root of the file system:
//
//   - A leading "/" is stripped (absolute names are relative to the layer
//     root, as in Docker). A name or hardlink target whose ".." components
//     climb above the root is refused with [ErrInvalid].
//   - Symbolic links met while resolving a parent directory, or the source
//     of a hardlink, are followed with the layer directory as their root
//     (openat2 RESOLVE_IN_ROOT): "evil -> /etc" then "evil/passwd" writes
//     dir/etc/passwd, never /etc/passwd. The last component of an entry is
//     never followed: an entry replaces whatever is there.
//   - Hardlinks must name a file the layer already holds; a hardlink to a
//     symlink links the symlink itself.
//   - Top-level aufs bookkeeping (".wh..wh.plnk" and the like) is skipped.
//
// The tree is written in overlayfs's own lower-layer format, not applied by
// deleting: ".wh.NAME" becomes the whiteout NAME (a character device 0/0),
// and ".wh..wh..opq" sets trusted.overlay.opaque=y on its directory.
// Following the OCI image spec, a whiteout only hides lower layers: when the
// layer itself also holds NAME the whiteout adds nothing for a file, and
// makes a directory opaque. Extended attributes in the overlay namespaces
// (trusted.overlay.*, user.overlay.*) are dropped from the tar, since they
// would let a layer forge redirects and metacopy files.
//
// Duplicate entries are resolved as GNU tar does: the last one wins,
// replacing what is there, except that a directory over a directory keeps
// the content and takes the new metadata. Directory modes, owners and times
// are applied in a final pass, so entries written later do not disturb them.
//
// Without root, ownership is not applied, and device nodes other than
// whiteouts, opaque directories and trusted.* attributes cannot be created.
//
// The root entry ("./") sets the mode, owner and times of dir itself, as
// GNU tar does.
package unpack

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/layerindex"
)

// Budgets applied when Options leaves them zero.
const (
	DefaultMaxBytes   = 64 << 30 // uncompressed bytes
	DefaultMaxEntries = 1 << 20
)

var (
	// ErrInvalid reports a layer that is corrupt, truncated or hostile:
	// a path escaping the layer, a bad whiteout, an unsupported entry.
	ErrInvalid = errors.New("invalid layer")
	// ErrTooLarge reports a layer over one of the budgets in Options.
	ErrTooLarge = errors.New("layer exceeds budget")
)

// Options tune Layer. The zero value is ready to use.
type Options struct {
	// MaxBytes bounds both the uncompressed tar stream and the sum of the
	// regular files' sizes (sparse files count at their full size).
	// Zero means DefaultMaxBytes.
	MaxBytes int64
	// MaxEntries bounds the number of tar entries, and separately the
	// entries plus the parent directories created for names whose
	// directories the tar lacks. Zero means DefaultMaxEntries.
	MaxEntries int
	// Logger receives debug records for skipped entries and warnings for
	// dropped overlay attributes. Nil discards.
	Logger *slog.Logger
	// Progress, if set, is called after each read from the blob with the
	// number of (compressed) bytes read so far.
	Progress func(bytesRead int64)
}

// Stats describe an unpacked layer.
type Stats struct {
	Entries int           // tar entries read
	Bytes   int64         // regular file content written
	Size    int64         // length of the uncompressed tar stream
	DiffID  digest.Digest // sha256 of the uncompressed tar stream
}

// Layer unpacks the layer blob r (gzip, zstd or plain tar, told apart by
// their magic bytes) into dir, which should be an empty directory. It reads
// r to its end, so the DiffID covers the whole uncompressed stream, to be
// checked against the image config's rootfs.diff_ids. On error dir holds a
// partial tree, confined to dir, which the caller removes. Errors about one
// entry name it.
func Layer(ctx context.Context, r io.Reader, dir string, opts Options) (Stats, error) {
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	var st Stats
	src := &source{ctx: ctx, r: r, progress: opts.Progress}
	br := bufio.NewReaderSize(src, 64<<10)
	comp, dec, err := layerindex.Decompress(br, 0)
	if err != nil {
		var le *layerindex.LayerError
		if errors.As(err, &le) {
			return st, fmt.Errorf("%w: %s", ErrInvalid, le.Reason)
		}
		return st, src.classify(err, comp)
	}
	defer dec.Close()
	s := &stream{r: dec, h: sha256.New(), max: opts.MaxBytes}

	x, err := newExtractor(dir, opts)
	if err != nil {
		return st, err
	}
	defer x.close()

	tr := tar.NewReader(s)
	for {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil && !(errors.Is(err, tar.ErrInsecurePath) && hdr != nil) {
			return st, src.classify(err, comp)
		}
		st.Entries++
		if st.Entries > opts.MaxEntries {
			return st, fmt.Errorf("%w: more than %d entries", ErrTooLarge, opts.MaxEntries)
		}
		content := &readErr{r: tr}
		if err := x.entry(hdr, content); err != nil {
			if content.err != nil {
				// The content could not be read: the stream is bad, not the entry.
				err = src.classify(content.err, comp)
			}
			return st, fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
	}
	// Go's tar reader takes a stream that simply stops between entries as
	// the end; a real archive ends with zero blocks.
	if s.zeros < blockSize {
		return st, fmt.Errorf("%w: truncated tar stream (no end-of-archive marker)", ErrInvalid)
	}
	// The rest of the stream (record padding) belongs to the DiffID, and
	// reading it to the end verifies the compression's checksums.
	if _, err := io.Copy(io.Discard, s); err != nil {
		return st, src.classify(err, comp)
	}
	if err := x.finish(); err != nil {
		return st, err
	}
	st.Bytes = x.written
	st.Size = s.n
	st.DiffID = digest.NewDigest(digest.SHA256, s.h)
	opts.Logger.DebugContext(ctx, "unpacked layer", "dir", dir, "entries", st.Entries,
		"bytes", st.Bytes, "compression", comp, "diffID", st.DiffID)
	return st, nil
}

const blockSize = 512

// source reads the blob, reports progress, honours ctx and remembers a
// failure of the underlying reader, so that it is not mistaken for a
// corrupt layer.
type source struct {
	ctx      context.Context
	r        io.Reader
	n        int64
	progress func(int64)
	err      error
}

func (s *source) Read(p []byte) (int, error) {
	if err := s.ctx.Err(); err != nil {
		s.err = err
		return 0, err
	}
	n, err := s.r.Read(p)
	s.n += int64(n)
	if n > 0 && s.progress != nil {
		s.progress(s.n)
	}
	if err != nil && err != io.EOF {
		s.err = err
	}
	return n, err
}

// readErr remembers the error of the reader it wraps.
type readErr struct {
	r   io.Reader
	err error
}

func (r *readErr) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

// classify turns an error met while reading the layer into one sentence:
// a failed download or cancellation, a budget exceeded, or a corrupt stream.
func (s *source) classify(err error, comp string) error {
	switch {
	case s.err != nil && s.ctx.Err() != nil:
		return s.ctx.Err()
	case s.err != nil:
		return fmt.Errorf("read layer blob: %w", s.err)
	case errors.Is(err, errBudget):
		return fmt.Errorf("%w: more than %d uncompressed bytes", ErrTooLarge, s.maxBytes(err))
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrTooLarge):
		return err
	case comp == "tar":
		return fmt.Errorf("%w: corrupt or truncated tar stream: %v", ErrInvalid, err)
	default:
		return fmt.Errorf("%w: corrupt or truncated %s stream: %v", ErrInvalid, comp, err)
	}
}

func (s *source) maxBytes(err error) int64 {
	var b *budgetError
	if errors.As(err, &b) {
		return b.max
	}
	return 0
}

var errBudget = errors.New("byte budget exceeded")

type budgetError struct{ max int64 }

func (e *budgetError) Error() string   { return fmt.Sprintf("more than %d bytes", e.max) }
func (e *budgetError) Is(t error) bool { return t == errBudget }

// stream is the uncompressed tar stream: hashed for the DiffID, bounded by
// the byte budget, and watched for the run of zeros that ends an archive.
type stream struct {
	r     io.Reader
	h     hash.Hash
	n     int64
	max   int64
	zeros int64 // length of the run of zero bytes ending what was read
}

func (s *stream) Read(p []byte) (int, error) {
	if s.n > s.max {
		return 0, &budgetError{s.max}
	}
	if lim := s.max - s.n + 1; int64(len(p)) > lim {
		p = p[:lim]
	}
	n, err := s.r.Read(p)
	b := p[:n]
	s.n += int64(n)
	s.h.Write(b)
	i := len(b)
	for i > 0 && b[i-1] == 0 {
		i--
	}
	if i == 0 {
		s.zeros += int64(n)
	} else {
		s.zeros = int64(n - i)
	}
	if s.n > s.max {
		return n, &budgetError{s.max}
	}
	return n, err
}
