package registry

import (
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// Defaults of Options.MaxBlobSize and Options.MaxUploadsPerClient.
const (
	DefaultMaxBlobSize         = 64 << 30
	DefaultMaxUploadsPerClient = 256
)

func (o Options) maxBlobSize() int64 {
	switch {
	case o.MaxBlobSize < 0:
		return 0 // no limit
	case o.MaxBlobSize == 0:
		return DefaultMaxBlobSize
	}
	return o.MaxBlobSize
}

func (o Options) maxUploads() int {
	switch {
	case o.MaxUploadsPerClient < 0:
		return 0 // no limit
	case o.MaxUploadsPerClient == 0:
		return DefaultMaxUploadsPerClient
	}
	return o.MaxUploadsPerClient
}

func (reg *Registry) requestTimeout() time.Duration {
	switch t := reg.opts.RequestTimeout; {
	case t < 0:
		return 0
	case t == 0:
		return DefaultRequestTimeout
	default:
		return t
	}
}

func errTooLarge(max int64) *regError {
	return newErr(http.StatusRequestEntityTooLarge, codeSizeInvalid, fmt.Sprintf("blob larger than this registry's limit of %d bytes", max))
}

// limitBody returns the body of a request that adds to a blob of which
// have bytes are stored already: an error at once if its declared length
// takes the blob past the limit, else a reader that fails (with a 413)
// when it would.
func (reg *Registry) limitBody(r *http.Request, have int64) (io.Reader, error) {
	max := reg.opts.maxBlobSize()
	if max == 0 {
		return r.Body, nil
	}
	if r.ContentLength > max-have {
		return nil, errTooLarge(max)
	}
	return &capReader{r: r.Body, left: max - have, max: max}, nil
}

// capReader reads at most left bytes of r, and fails if r has more.
type capReader struct {
	r         io.Reader
	left, max int64
}

func (c *capReader) Read(p []byte) (int, error) {
	if c.left <= 0 {
		// Anything beyond the limit is an error, not an early EOF.
		var b [1]byte
		if n, _ := c.r.Read(b[:]); n > 0 {
			return 0, errTooLarge(c.max)
		}
		return c.r.Read(p[:0])
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

// sessions counts the upload sessions each client opened through this
// process and has not ended, so that one client cannot open unbounded
// numbers of them (each holds a directory and an open-ended file).
type sessions struct {
	mu     sync.Mutex
	client map[string]string              // session id → client
	open   map[string]map[string]struct{} // client → session ids
}

// admit reports whether client may open another session. At the limit it
// first forgets sessions that ended without this process seeing it (purged
// as stale).
func (reg *Registry) admitUpload(client string) error {
	max := reg.opts.maxUploads()
	if max == 0 {
		return nil
	}
	s := &reg.sessions
	s.mu.Lock()
	ids := make([]string, 0, len(s.open[client]))
	for id := range s.open[client] {
		ids = append(ids, id)
	}
	s.mu.Unlock()
	if len(ids) < max {
		return nil
	}
	for _, id := range ids {
		if !reg.store.UploadExists(id) {
			reg.endUpload(id)
		}
	}
	s.mu.Lock()
	n := len(s.open[client])
	s.mu.Unlock()
	if n >= max {
		return newErr(http.StatusTooManyRequests, codeTooManyRequests, fmt.Sprintf("%d upload sessions open from this client: finish or cancel some first", n))
	}
	return nil
}

func (reg *Registry) startedUpload(client, id string) {
	s := &reg.sessions
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client == nil {
		s.client, s.open = map[string]string{}, map[string]map[string]struct{}{}
	}
	s.client[id] = client
	if s.open[client] == nil {
		s.open[client] = map[string]struct{}{}
	}
	s.open[client][id] = struct{}{}
}

func (reg *Registry) endUpload(id string) {
	s := &reg.sessions
	s.mu.Lock()
	defer s.mu.Unlock()
	client, ok := s.client[id]
	if !ok {
		return
	}
	delete(s.client, id)
	delete(s.open[client], id)
	if len(s.open[client]) == 0 {
		delete(s.open, client)
	}
}
