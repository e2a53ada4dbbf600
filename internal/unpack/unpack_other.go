//go:build !linux

package unpack

import (
	"archive/tar"
	"errors"
	"io"
)

// extractor needs Linux: openat2, mknodat, overlayfs whiteouts.
type extractor struct{ written int64 }

func newExtractor(string, Options) (*extractor, error) {
	return nil, errors.New("unpacking layers is supported on Linux only")
}

func (*extractor) entry(*tar.Header, io.Reader) error { return errors.ErrUnsupported }
func (*extractor) finish() error                      { return errors.ErrUnsupported }
func (*extractor) close()                             {}
