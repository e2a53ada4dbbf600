package s3store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strconv"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/strata-oci/strata/internal/store"
)

// multipart is a multipart upload to one key, written a part at a time
// from a buffer of at most a part (grown as bytes come: a small file
// takes little memory).
type multipart struct {
	d        *Driver
	key      string
	uploadID string
	parts    []appendPart
	buf      []byte
}

type appendPart struct {
	N    int32  `json:"n"`
	ETag string `json:"etag"`
	Size int64  `json:"size"`
}

// fill appends the start of p to the buffer, up to a part, and returns
// the rest.
func (m *multipart) fill(p []byte) []byte {
	n := min(len(p), int(m.d.opts.PartSize)-len(m.buf))
	m.buf = append(m.buf, p[:n]...)
	return p[n:]
}

func (m *multipart) full() bool { return int64(len(m.buf)) >= m.d.opts.PartSize }

// flush uploads the buffer as the next part.
func (m *multipart) flush(ctx context.Context) error {
	if m.uploadID == "" {
		out, err := m.d.client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &m.d.opts.Bucket, Key: aws.String(m.d.key(m.key))})
		if err != nil {
			return fail("upload", m.key, err)
		}
		m.uploadID = aws.ToString(out.UploadId)
	}
	n := int32(len(m.parts) + 1)
	out, err := m.d.client.UploadPart(ctx, &s3.UploadPartInput{
		Bucket: &m.d.opts.Bucket, Key: aws.String(m.d.key(m.key)), UploadId: aws.String(m.uploadID),
		PartNumber: aws.Int32(n), Body: bytes.NewReader(m.buf), ContentLength: aws.Int64(int64(len(m.buf))),
	})
	if err != nil {
		return fail("upload part", m.key, err)
	}
	m.parts = append(m.parts, appendPart{N: n, ETag: aws.ToString(out.ETag), Size: int64(len(m.buf))})
	m.buf = m.buf[:0]
	return nil
}

// complete makes the object: the buffer as its last part, or alone with
// one PUT if no part was uploaded.
func (m *multipart) complete(ctx context.Context) error {
	if m.uploadID == "" {
		_, err := m.d.client.PutObject(ctx, &s3.PutObjectInput{
			Bucket: &m.d.opts.Bucket, Key: aws.String(m.d.key(m.key)),
			Body: bytes.NewReader(m.buf), ContentLength: aws.Int64(int64(len(m.buf))),
		})
		if err != nil {
			return fail("put", m.key, err)
		}
		return nil
	}
	if len(m.buf) > 0 {
		if err := m.flush(ctx); err != nil {
			return err
		}
	}
	parts := make([]types.CompletedPart, len(m.parts))
	for i, p := range m.parts {
		parts[i] = types.CompletedPart{ETag: aws.String(p.ETag), PartNumber: aws.Int32(p.N)}
	}
	_, err := m.d.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket: &m.d.opts.Bucket, Key: aws.String(m.d.key(m.key)), UploadId: aws.String(m.uploadID),
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
	})
	if err != nil {
		var nsu *types.NoSuchUpload
		if errors.As(err, &nsu) {
			// Completed before by a request whose answer was lost?
			var size int64
			for _, p := range m.parts {
				size += p.Size
			}
			if h, herr := m.d.head(ctx, m.key); herr == nil && aws.ToInt64(h.ContentLength) == size {
				return nil
			}
		}
		return fail("complete", m.key, err)
	}
	return nil
}

// ---- Create ----

// Create implements store.Driver: a multipart upload to key, completed
// by Commit (one PUT if the content is less than a part).
func (d *Driver) Create(ctx context.Context, key string) (store.Writer, error) {
	return &createWriter{ctx: ctx, m: multipart{d: d, key: key}}, nil
}

type createWriter struct {
	ctx  context.Context // Create's, for the writes: io.Writer has no other
	m    multipart
	size int64
	err  error
	done bool
}

func (w *createWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	n := len(p)
	for len(p) > 0 {
		p = w.m.fill(p)
		if w.m.full() {
			if w.err = w.m.flush(w.ctx); w.err != nil {
				return n - len(p), w.err
			}
		}
	}
	w.size += int64(n)
	return n, nil
}

func (w *createWriter) Size() int64 { return w.size }

func (w *createWriter) Close() error {
	if !w.done {
		w.done = true
		if w.m.uploadID != "" {
			w.m.d.abort(w.ctx, w.m.key, w.m.uploadID)
		}
	}
	return nil
}

func (w *createWriter) Cancel(ctx context.Context) error { return w.Close() }

func (w *createWriter) Commit(ctx context.Context) error {
	if w.done {
		return errors.New("s3: commit of a closed writer")
	}
	if w.err != nil {
		w.Close()
		return w.err
	}
	if err := w.m.complete(ctx); err != nil {
		w.Close()
		return err
	}
	w.done = true
	return nil
}

// ---- Append ----

// stateSuffix names the state object of an Append file: key+stateSuffix.
const stateSuffix = ".upload"

// appendState is what an Append file is between writers.
type appendState struct {
	UploadID string       `json:"uploadId,omitempty"`
	Parts    []appendPart `json:"parts,omitempty"`
	// Tail are the objects holding the bytes after the parts, in order,
	// fewer than a part in all: each writer that closes adds one with
	// what it wrote, until they fill a part.
	Tail []tailPiece `json:"tail,omitempty"`
	// Gen counts the writers that changed the file; it names the pieces.
	Gen int `json:"gen"`
}

type tailPiece struct {
	Key  string `json:"key"`
	Size int64  `json:"size"`
}

func (st *appendState) size() int64 {
	var n int64
	for _, p := range st.Parts {
		n += p.Size
	}
	for _, t := range st.Tail {
		n += t.Size
	}
	return n
}

// Append implements store.Driver: the file is a multipart upload whose
// state (appendState) is the object key+".upload", written when a writer
// closes. Parts are uploaded as they fill; what a writer leaves that does
// not fill a part is written as a piece of the tail (key+".tail-<n>"), read
// back once the next writers fill the part. Each byte is so written at most
// twice, whatever the size of the chunks a client sends. A committed file
// (the object key exists, without a state) gives a writer that writes
// nothing and commits at once.
func (d *Driver) Append(ctx context.Context, key string, create bool) (store.Writer, error) {
	w := &appendWriter{ctx: ctx, m: multipart{d: d, key: key}}
	b, err := d.Get(ctx, key+stateSuffix)
	switch {
	case err == nil:
		if err := json.Unmarshal(b, &w.st); err != nil {
			return nil, fmt.Errorf("s3 append %s: corrupt state: %w", key, err)
		}
		w.m.uploadID, w.m.parts = w.st.UploadID, append([]appendPart(nil), w.st.Parts...)
		w.pending = append([]tailPiece(nil), w.st.Tail...)
		for _, t := range w.pending {
			w.pendingSize += t.Size
		}
		w.size = w.st.size()
		return w, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, err
	case create:
		w.dirty = true
		return w, nil
	}
	h, herr := d.head(ctx, key)
	if herr != nil {
		return nil, herr
	}
	w.committed, w.size = true, aws.ToInt64(h.ContentLength)
	return w, nil
}

type appendWriter struct {
	ctx context.Context // Append's, for the writes and Close
	st  appendState     // as it was when the writer was opened
	m   multipart       // m.buf: what this writer wrote, not in a part yet
	// pending are the pieces of the tail before m.buf, not in a part yet.
	pending     []tailPiece
	pendingSize int64
	size        int64
	dirty       bool
	committed   bool
	err         error
}

// withPending puts the bytes of the pending pieces before m.buf.
func (w *appendWriter) withPending(ctx context.Context) error {
	if len(w.pending) == 0 {
		return nil
	}
	n := len(w.m.buf)
	buf := make([]byte, int(w.pendingSize)+n, max(int(w.pendingSize)+n, int(w.m.d.opts.PartSize)))
	copy(buf[w.pendingSize:], w.m.buf)
	off := 0
	for _, t := range w.pending {
		b, err := w.m.d.Get(ctx, t.Key)
		if err != nil {
			return err
		}
		if int64(len(b)) != t.Size {
			return fmt.Errorf("s3 append %s: tail %s has %d bytes, not %d", w.m.key, t.Key, len(b), t.Size)
		}
		off += copy(buf[off:], b)
	}
	w.m.buf, w.pending, w.pendingSize = buf, nil, 0
	return nil
}

func (w *appendWriter) Write(p []byte) (int, error) {
	if w.committed {
		return 0, fmt.Errorf("s3 append %s: committed", w.m.key)
	}
	if w.err != nil {
		return 0, w.err
	}
	w.dirty = true
	n := len(p)
	for len(p) > 0 {
		room := int(w.m.d.opts.PartSize-w.pendingSize) - len(w.m.buf)
		k := min(len(p), room)
		w.m.buf = append(w.m.buf, p[:k]...)
		p = p[k:]
		if k == room {
			if w.err = w.withPending(w.ctx); w.err == nil {
				w.err = w.m.flush(w.ctx)
			}
			if w.err != nil {
				return n - len(p), w.err
			}
		}
	}
	w.size += int64(n)
	return n, nil
}

func (w *appendWriter) Size() int64 { return w.size }

// Close writes a piece of the tail with what is left of this writer's
// bytes, then the state: the state names only complete pieces and parts
// that are uploaded. Pieces that went into parts are deleted after.
func (w *appendWriter) Close() error {
	if w.committed || !w.dirty {
		return nil
	}
	if w.err != nil {
		return w.err
	}
	ctx := w.ctx
	st := appendState{UploadID: w.m.uploadID, Parts: w.m.parts, Gen: w.st.Gen + 1, Tail: w.pending}
	if len(w.m.buf) > 0 {
		t := tailPiece{Key: w.m.key + ".tail-" + strconv.Itoa(st.Gen), Size: int64(len(w.m.buf))}
		if err := w.m.d.Put(ctx, t.Key, w.m.buf); err != nil {
			return err
		}
		st.Tail = append(st.Tail, t)
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := w.m.d.Put(ctx, w.m.key+stateSuffix, b); err != nil {
		return err
	}
	w.deletePieces(ctx, st.Tail)
	w.dirty = false
	return nil
}

// deletePieces deletes the pieces of the tail the writer was opened with
// that keep are not.
func (w *appendWriter) deletePieces(ctx context.Context, keep []tailPiece) {
	for _, t := range w.st.Tail {
		if !slices.Contains(keep, t) {
			w.m.d.deleteObject(ctx, t.Key)
		}
	}
}

// Cancel drops what this writer wrote: nothing of it is in the state
// (parts it uploaded are replaced by the next writer's of the same
// numbers, or dropped when the upload completes).
func (w *appendWriter) Cancel(ctx context.Context) error {
	if w.st.UploadID == "" && w.m.uploadID != "" {
		w.m.d.abort(ctx, w.m.key, w.m.uploadID)
	}
	w.dirty = false
	return nil
}

// Commit completes the multipart upload (the tail its last part), then
// removes the state and the tail.
func (w *appendWriter) Commit(ctx context.Context) error {
	if w.committed {
		return nil
	}
	if w.err != nil {
		return w.err
	}
	if err := w.withPending(ctx); err != nil {
		return err
	}
	if err := w.m.complete(ctx); err != nil {
		return err
	}
	w.committed = true
	w.m.d.deleteObject(ctx, w.m.key+stateSuffix)
	w.deletePieces(ctx, nil)
	return nil
}

// abortAppend aborts the multipart upload of Append file key, if it has
// one.
func (d *Driver) abortAppend(ctx context.Context, key string) {
	b, err := d.Get(ctx, key+stateSuffix)
	if err != nil {
		return
	}
	var st appendState
	if json.Unmarshal(b, &st) == nil && st.UploadID != "" {
		d.abort(ctx, key, st.UploadID)
	}
}
