package layerindex

import (
	"crypto/sha256"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// frameDecoder decodes frames for DecodeFrame. DecodeAll is safe for
// concurrent use; the limits keep a hostile frame from asking for more than
// a frame may hold.
var frameDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(MaxFrameSize),
		zstd.WithDecoderMaxWindow(MaxFrameSize),
	)
})

// DecodeFrame verifies the compressed bytes of frame i against the index
// (length and sha256) and returns its uncompressed content, which it checks
// has the frame's USize. It fails with ErrInvalidFrame otherwise: a node
// never serves bytes that did not pass through here.
func (x *Index) DecodeFrame(i int, compressed []byte) ([]byte, error) {
	return x.AppendFrame(nil, i, compressed)
}

// AppendFrame is DecodeFrame appending the content to dst.
func (x *Index) AppendFrame(dst []byte, i int, compressed []byte) ([]byte, error) {
	return x.appendFrame(dst, i, compressed, true)
}

// DecodeVerifiedFrame is DecodeFrame for bytes the caller has already
// checked against frame i's digest (a content-addressed cache that
// verifies what it returns): it skips hashing them again.
func (x *Index) DecodeVerifiedFrame(i int, compressed []byte) ([]byte, error) {
	return x.appendFrame(nil, i, compressed, false)
}

func (x *Index) appendFrame(dst []byte, i int, compressed []byte, verify bool) ([]byte, error) {
	if i < 0 || i >= len(x.Frames) {
		return dst, fmt.Errorf("%w: no frame %d", ErrInvalidFrame, i)
	}
	f := &x.Frames[i]
	if int64(len(compressed)) != f.CSize {
		return dst, fmt.Errorf("%w: frame %d: %d bytes, want %d", ErrInvalidFrame, i, len(compressed), f.CSize)
	}
	if verify {
		sum := sha256.Sum256(compressed)
		if digest.NewDigestFromBytes(digest.SHA256, sum[:]) != f.Digest {
			return dst, fmt.Errorf("%w: frame %d: digest mismatch", ErrInvalidFrame, i)
		}
	}
	dec, err := frameDecoder()
	if err != nil {
		return dst, err
	}
	n := len(dst)
	if cap(dst)-n < int(f.USize) {
		dst = append(make([]byte, 0, n+int(f.USize)), dst...)
	}
	out, err := dec.DecodeAll(compressed, dst)
	if err != nil {
		return dst[:n], fmt.Errorf("%w: frame %d: %v", ErrInvalidFrame, i, err)
	}
	if int64(len(out)-n) != f.USize {
		return dst[:n], fmt.Errorf("%w: frame %d: %d bytes uncompressed, want %d", ErrInvalidFrame, i, len(out)-n, f.USize)
	}
	return out, nil
}

// ReadFile returns the content of the regular file (or hardlink to one) at
// path p, reading its frames from the data blob, verifying each frame and
// then the file's sha256. It reads the whole file into memory: it is meant
// for tests and tools, not for serving large files.
func (x *Index) ReadFile(data io.ReaderAt, p string) ([]byte, error) {
	i, ok := x.Lookup(p)
	if !ok {
		return nil, fmt.Errorf("read %s: no such entry", p)
	}
	e := &x.Entries[i]
	if e.Type == TypeHardlink {
		j, ok := x.Lookup(e.Linkname)
		if !ok {
			return nil, fmt.Errorf("read %s: hardlink target %s missing", p, e.Linkname)
		}
		e = &x.Entries[j]
	}
	if e.Type != TypeReg {
		return nil, fmt.Errorf("read %s: not a regular file (%s)", p, e.Type)
	}
	out := make([]byte, 0, e.Size)
	first, last := x.FramesFor(e.Offset, e.Size)
	var buf []byte
	var content []byte
	for k := first; k <= last; k++ {
		f := &x.Frames[k]
		if int64(cap(buf)) < f.CSize {
			buf = make([]byte, f.CSize)
		}
		buf = buf[:f.CSize]
		if _, err := data.ReadAt(buf, f.COffset); err != nil && !(err == io.EOF && f.COffset+f.CSize == x.DataSize) {
			return nil, fmt.Errorf("read %s: frame %d: %w", p, k, err)
		}
		var err error
		content, err = x.AppendFrame(content[:0], k, buf)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", p, err)
		}
		lo := max(e.Offset-f.UOffset, 0)
		hi := min(e.Offset+e.Size-f.UOffset, f.USize)
		out = append(out, content[lo:hi]...)
	}
	if int64(len(out)) != e.Size {
		return nil, fmt.Errorf("read %s: %w: got %d bytes, want %d", p, ErrInvalidFrame, len(out), e.Size)
	}
	sum := sha256.Sum256(out)
	if digest.NewDigestFromBytes(digest.SHA256, sum[:]) != e.Digest {
		return nil, fmt.Errorf("read %s: content does not match its digest %s", p, e.Digest)
	}
	return out, nil
}
