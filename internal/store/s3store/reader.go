package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/strata-oci/strata/internal/store"
)

// Windows of sequential reads: a read opens a ranged GET of the next
// window, which grows while reads follow each other (a whole blob is a
// few large GETs, a 1 MiB range one GET read to its end, so that its
// connection is reused).
const (
	firstWindow = 1 << 20
	maxWindow   = 32 << 20
	// drainMax: a GET closed with this much or less left unread is read
	// to its end, which keeps its connection for the next request.
	drainMax = 256 << 10
)

// reader reads an object by ranged GETs.
type reader struct {
	// ctx is the context of Open, the request's: an io.Reader has no
	// other way to be told that its reader is gone.
	ctx  context.Context
	d    *Driver
	key  string
	size int64
	pos  int64

	body             io.ReadCloser // a GET of [bodyPos, bodyEnd), or nil
	bodyPos, bodyEnd int64
	window           int64
}

var _ store.Reader = (*reader)(nil)

func (r *reader) get(off, end int64) (io.ReadCloser, error) {
	out, err := r.d.client.GetObject(r.ctx, &s3.GetObjectInput{
		Bucket: &r.d.opts.Bucket, Key: aws.String(r.d.key(r.key)),
		Range: aws.String(fmt.Sprintf("bytes=%d-%d", off, end-1)),
	})
	if err != nil {
		return nil, fail("get", r.key, err)
	}
	return out.Body, nil
}

func (r *reader) Read(p []byte) (int, error) {
	if r.pos >= r.size {
		return 0, io.EOF
	}
	if r.body != nil && r.bodyPos != r.pos {
		r.closeBody()
	}
	if r.body == nil {
		switch {
		case r.window == 0:
			r.window = firstWindow
		case r.window < maxWindow:
			r.window *= 2
		}
		end := min(r.pos+r.window, r.size)
		body, err := r.get(r.pos, end)
		if err != nil {
			return 0, err
		}
		r.body, r.bodyPos, r.bodyEnd = body, r.pos, end
	}
	if int64(len(p)) > r.bodyEnd-r.bodyPos {
		p = p[:r.bodyEnd-r.bodyPos]
	}
	n, err := r.body.Read(p)
	r.bodyPos += int64(n)
	r.pos += int64(n)
	if errors.Is(err, io.EOF) {
		err = nil
		if r.bodyPos < r.bodyEnd {
			err = fmt.Errorf("s3 get %s: %w: %w", r.key, store.ErrUnavailable, io.ErrUnexpectedEOF)
		}
	}
	if err != nil && !errors.Is(err, store.ErrUnavailable) {
		err = fail("get", r.key, err)
	}
	if r.bodyPos == r.bodyEnd || err != nil {
		r.closeBody()
	}
	return n, err
}

// ReadAt reads with a GET of exactly [off, off+len(p)).
func (r *reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("s3 get %s: negative offset", r.key)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), r.size)
	body, err := r.get(off, end)
	if err != nil {
		return 0, err
	}
	defer body.Close()
	n, err := io.ReadFull(body, p[:end-off])
	if err != nil {
		return n, fmt.Errorf("s3 get %s: %w: %w", r.key, store.ErrUnavailable, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (r *reader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.pos
	case io.SeekEnd:
		offset += r.size
	default:
		return 0, errors.New("seek: bad whence")
	}
	if offset < 0 {
		return 0, errors.New("seek: negative position")
	}
	if offset != r.pos {
		r.window = 0
	}
	r.pos = offset
	return offset, nil
}

func (r *reader) closeBody() {
	if r.body == nil {
		return
	}
	if r.bodyEnd-r.bodyPos <= drainMax {
		io.Copy(io.Discard, r.body)
	}
	r.body.Close()
	r.body = nil
}

func (r *reader) Close() error {
	r.closeBody()
	return nil
}
