package layerindex

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"io"

	"github.com/klauspost/compress/zstd"
)

// Compression formats Decompress recognises.
const (
	FormatTar  = "tar"
	FormatGzip = "gzip" // eStargz layers are gzip too
	FormatZstd = "zstd"
)

// Decompress detects the compression of a layer blob by its magic bytes and
// returns the format and a reader of the tar stream. Gzip, zstd (with the
// decoder's window and memory bounded by maxZstdWindow; <= 0 means
// DefaultMaxZstdWindow) and uncompressed tar are supported; bzip2 and xz are
// refused with a *LayerError. Errors reading a gzip or zstd header are
// returned as they are, for the caller to classify.
func Decompress(r io.Reader, maxZstdWindow int64) (format string, rc io.ReadCloser, err error) {
	if maxZstdWindow <= 0 {
		maxZstdWindow = DefaultMaxZstdWindow
	}
	br, ok := r.(*bufio.Reader)
	if !ok || br.Size() < 64<<10 {
		br = bufio.NewReaderSize(r, 64<<10)
	}
	magic, _ := br.Peek(6)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return FormatGzip, nil, err
		}
		return FormatGzip, zr, nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}),
		// a zstd skippable frame first
		len(magic) >= 4 && magic[0]&0xf0 == 0x50 && bytes.Equal(magic[1:4], []byte{0x2a, 0x4d, 0x18}):
		zr, err := zstd.NewReader(br,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(uint64(maxZstdWindow)),
			zstd.WithDecoderMaxMemory(uint64(maxZstdWindow)),
		)
		if err != nil {
			return FormatZstd, nil, err
		}
		return FormatZstd, zr.IOReadCloser(), nil
	case bytes.HasPrefix(magic, []byte("BZh")):
		return "bzip2", nil, &LayerError{Reason: "bzip2 compression is not supported"}
	case bytes.HasPrefix(magic, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		return "xz", nil, &LayerError{Reason: "xz compression is not supported"}
	}
	return FormatTar, io.NopCloser(br), nil
}
