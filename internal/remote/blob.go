package remote

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func blobPath(repo Repository, d digest.Digest) string {
	return "/v2/" + repo.Name + "/blobs/" + d.String()
}

// readBlob reads a small blob into memory and verifies its size and digest.
func (c *Client) readBlob(ctx context.Context, repo Repository, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	if desc.Size > limit {
		return nil, fmt.Errorf("%w: blob %s is %d bytes, more than the %d accepted", ErrUnsupported, desc.Digest, desc.Size, limit)
	}
	if !desc.Digest.Algorithm().Available() {
		return nil, fmt.Errorf("%w: digest algorithm of %s", ErrUnsupported, desc.Digest)
	}
	var b []byte
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     blobPath(repo, desc.Digest),
		scope:    repo.scope(),
		read: func(resp *http.Response) error {
			var err error
			b, err = io.ReadAll(io.LimitReader(resp.Body, desc.Size+1))
			if err != nil {
				return fmt.Errorf("read blob %s: %w", desc.Digest, err)
			}
			return nil
		},
	})
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != desc.Size {
		return nil, fmt.Errorf("blob %s: %w: got %d bytes, want %d", desc.Digest, ErrDigestMismatch, len(b), desc.Size)
	}
	if got := desc.Digest.Algorithm().FromBytes(b); got != desc.Digest {
		return nil, fmt.Errorf("blob %s: %w: content is %s", desc.Digest, ErrDigestMismatch, got)
	}
	return b, nil
}

// FetchBlob streams a whole blob. The reader verifies size and digest: it
// returns io.EOF only after all desc.Size bytes hashed to desc.Digest, and
// an error wrapping ErrDigestMismatch otherwise. A transfer broken by a
// transient failure resumes where it stopped (a Range request), within the
// retry policy. Each read waits at most Options.Timeout for bytes; ctx bounds
// the whole stream. The caller closes the reader.
func (c *Client) FetchBlob(ctx context.Context, repo Repository, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("fetch blob %q: %w", desc.Digest, err)
	}
	if desc.Size < 0 {
		return nil, fmt.Errorf("fetch blob %s: negative size %d", desc.Digest, desc.Size)
	}
	br := &blobReader{c: c, ctx: ctx, repo: repo, desc: desc, digester: desc.Digest.Algorithm().Digester()}
	if err := br.open(); err != nil {
		return nil, err
	}
	return br, nil
}

// blobReader verifies a blob as it streams and resumes broken transfers.
// It keeps the FetchBlob call's ctx: the reader is that call's result.
type blobReader struct {
	c        *Client
	ctx      context.Context
	repo     Repository
	desc     ocispec.Descriptor
	digester digest.Digester
	body     io.ReadCloser
	off      int64
	resumes  int
	err      error
}

// open (re)starts the transfer at br.off.
func (br *blobReader) open() error {
	r := request{
		method:   http.MethodGet,
		registry: br.repo.Registry,
		path:     blobPath(br.repo, br.desc.Digest),
		scope:    br.repo.scope(),
		accept:   []int{http.StatusOK},
	}
	if br.off > 0 {
		r.header = http.Header{"Range": {fmt.Sprintf("bytes=%d-", br.off)}}
		r.accept = []int{http.StatusOK, http.StatusPartialContent}
	}
	resp, err := br.c.send(br.ctx, r)
	if err != nil {
		return fmt.Errorf("fetch blob %s: %w", br.desc.Digest, err)
	}
	switch {
	case resp.StatusCode == http.StatusPartialContent:
		start, _, _, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != br.off {
			resp.Body.Close()
			return fmt.Errorf("fetch blob %s: %w: asked for bytes from %d, got Content-Range %q",
				br.desc.Digest, ErrInvalidResponse, br.off, resp.Header.Get("Content-Range"))
		}
	case br.off > 0:
		// The registry ignored Range: skip what was already read.
		if _, err := io.CopyN(io.Discard, resp.Body, br.off); err != nil {
			resp.Body.Close()
			return fmt.Errorf("fetch blob %s: skipping to %d: %w", br.desc.Digest, br.off, err)
		}
	}
	br.body = resp.Body
	return nil
}

func (br *blobReader) Read(p []byte) (int, error) {
	if br.err != nil {
		return 0, br.err
	}
	if br.body == nil {
		if err := br.open(); err != nil {
			br.err = err
			return 0, err
		}
	}
	// Never read past the expected size: a longer blob is a mismatch.
	if rest := br.desc.Size - br.off; int64(len(p)) > rest+1 {
		p = p[:rest+1]
	}
	n, err := br.body.Read(p)
	br.digester.Hash().Write(p[:n])
	br.off += int64(n)
	if br.off > br.desc.Size {
		br.err = fmt.Errorf("blob %s: %w: more than the %d bytes expected", br.desc.Digest, ErrDigestMismatch, br.desc.Size)
		return n, br.err
	}
	switch {
	case err == io.EOF:
		if br.off < br.desc.Size {
			br.err = fmt.Errorf("blob %s: %w: got %d bytes, want %d", br.desc.Digest, ErrDigestMismatch, br.off, br.desc.Size)
			return n, br.err
		}
		if got := br.digester.Digest(); got != br.desc.Digest {
			br.err = fmt.Errorf("blob %s: %w: content is %s", br.desc.Digest, ErrDigestMismatch, got)
			return n, br.err
		}
		br.err = io.EOF
		return n, io.EOF
	case err != nil:
		if br.ctx.Err() != nil || !transient(err) || br.resumes+1 >= br.c.retry.Attempts {
			br.err = fmt.Errorf("fetch blob %s at byte %d: %w", br.desc.Digest, br.off, err)
			return n, br.err
		}
		br.resumes++
		br.c.log.DebugContext(br.ctx, "resuming blob transfer", "digest", br.desc.Digest, "offset", br.off, "err", err)
		br.body.Close()
		br.body = nil
		if n == 0 {
			return br.Read(p)
		}
	}
	return n, nil
}

func (br *blobReader) Close() error {
	if br.body == nil {
		return nil
	}
	err := br.body.Close()
	br.body = nil
	if br.err == nil {
		br.err = errors.New("read of closed blob")
	}
	return err
}

// ReadRange reads n bytes of a blob from offset off with a ranged GET. The
// registry must answer 206 with exactly that Content-Range, or 200 with the
// whole blob (the range is cut out of it). The bytes are not verified: the
// caller knows the digests of the pieces it reads. Each attempt is bounded
// by Options.RangeTimeout.
func (c *Client) ReadRange(ctx context.Context, repo Repository, dgst digest.Digest, off, n int64) ([]byte, error) {
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("read range of blob %q: %w", dgst, err)
	}
	if off < 0 || n <= 0 {
		return nil, fmt.Errorf("read range of blob %s: bad range offset %d length %d", dgst, off, n)
	}
	end := off + n - 1
	buf := make([]byte, n)
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     blobPath(repo, dgst),
		scope:    repo.scope(),
		header:   http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, end)}},
		accept:   []int{http.StatusOK, http.StatusPartialContent},
		timeout:  c.opts.RangeTimeout,
		read: func(resp *http.Response) error {
			if resp.StatusCode == http.StatusPartialContent {
				cr := resp.Header.Get("Content-Range")
				s, e, _, err := parseContentRange(cr)
				if err != nil || s != off || e != end {
					return fmt.Errorf("%w: asked for bytes %d-%d, got Content-Range %q", ErrInvalidResponse, off, end, cr)
				}
			} else {
				if resp.ContentLength >= 0 && resp.ContentLength <= end {
					return fmt.Errorf("%w: bytes %d-%d are past the end of the %d-byte blob", ErrInvalidResponse, off, end, resp.ContentLength)
				}
				if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
					return fmt.Errorf("skip to %d: %w", off, err)
				}
			}
			if _, err := io.ReadFull(resp.Body, buf); err != nil {
				return fmt.Errorf("read bytes %d-%d: %w", off, end, err)
			}
			return nil
		},
	})
	if err != nil {
		return nil, fmt.Errorf("read range of blob %s: %w", dgst, err)
	}
	return buf, nil
}

// parseContentRange parses "bytes start-end/size"; size is -1 for "*".
func parseContentRange(v string) (start, end, size int64, err error) {
	bad := fmt.Errorf("bad Content-Range %q", v)
	rest, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, total, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return 0, 0, 0, bad
	}
	size = -1
	if total != "*" {
		size, err = strconv.ParseInt(total, 10, 64)
		if err != nil || size <= end {
			return 0, 0, 0, bad
		}
	}
	return start, end, size, nil
}

// ReadRanges reads several byte ranges [off, off+n) of a blob with one
// request (an HTTP multi-range request, answered with multipart/byteranges
// in the order asked) and hands each range to got as soon as its bytes
// have arrived, once per range, in the order they arrive. Ranges may not
// overlap. A registry may join ranges into larger parts; a part is taken
// for every range it covers. It fails with an error wrapping
// ErrUnsupported, before any range is handed over, when the registry
// answers with the whole blob (it does not serve multiple ranges; the
// client remembers that, and later calls for that registry fail at once);
// with another error when ranges are missing once the response ended (the
// ranges handed over stay handed over), or a part lies outside the span of
// the ranges asked. Only the bytes of asked ranges are kept; the rest of a
// part is read and dropped. Retries ask for every range again and hand
// over only those not handed over yet.
func (c *Client) ReadRanges(ctx context.Context, repo Repository, dgst digest.Digest, ranges [][2]int64, got func(i int, b []byte)) error {
	if err := dgst.Validate(); err != nil {
		return fmt.Errorf("read ranges of blob %q: %w", dgst, err)
	}
	if len(ranges) == 0 {
		return nil
	}
	var spec strings.Builder
	spec.WriteString("bytes=")
	byStart := make(map[int64]int, len(ranges))
	for i, r := range ranges {
		if r[0] < 0 || r[1] <= 0 {
			return fmt.Errorf("read ranges of blob %s: bad range offset %d length %d", dgst, r[0], r[1])
		}
		if _, dup := byStart[r[0]]; dup {
			return fmt.Errorf("read ranges of blob %s: range at %d asked twice", dgst, r[0])
		}
		byStart[r[0]] = i
		if i > 0 {
			spec.WriteByte(',')
		}
		fmt.Fprintf(&spec, "%d-%d", r[0], r[0]+r[1]-1)
	}
	sorted := slices.Clone(ranges)
	slices.SortFunc(sorted, func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
	for i := 1; i < len(sorted); i++ {
		if sorted[i-1][0]+sorted[i-1][1] > sorted[i][0] {
			return fmt.Errorf("read ranges of blob %s: ranges overlap at %d", dgst, sorted[i][0])
		}
	}
	if c.noMultiRange(repo.Registry) {
		return fmt.Errorf("read ranges of blob %s: %w: %s serves one range per request", dgst, ErrUnsupported, repo.Registry)
	}
	// Parts must lie within the span of the ranges asked.
	lo, hi := sorted[0][0], sorted[len(sorted)-1][0]+sorted[len(sorted)-1][1]
	handed := make([]bool, len(ranges))
	left := len(ranges)
	// readPart reads part [s, e] of the blob from r: the bytes of every
	// range it covers into a buffer of that range's own, the rest
	// discarded, and hands those ranges over.
	readPart := func(r io.Reader, cr string) error {
		s, e, _, err := parseContentRange(cr)
		if err != nil {
			return fmt.Errorf("%w: part: %v", ErrInvalidResponse, err)
		}
		if s < lo || e >= hi {
			return fmt.Errorf("%w: part %d-%d outside the ranges asked (%d-%d)", ErrInvalidResponse, s, e, lo, hi-1)
		}
		at := s
		i, _ := slices.BinarySearchFunc(sorted, s, func(r [2]int64, off int64) int { return cmp.Compare(r[0], off) })
		for ; i < len(sorted) && sorted[i][0]+sorted[i][1]-1 <= e; i++ {
			rg := sorted[i]
			if _, err := io.CopyN(io.Discard, r, rg[0]-at); err != nil {
				return fmt.Errorf("read bytes %d-%d: %w", s, e, err)
			}
			b := make([]byte, rg[1])
			if _, err := io.ReadFull(r, b); err != nil {
				return fmt.Errorf("read bytes %d-%d: %w", s, e, err)
			}
			at = rg[0] + rg[1]
			if k := byStart[rg[0]]; !handed[k] {
				handed[k] = true
				left--
				got(k, b)
			}
		}
		if _, err := io.CopyN(io.Discard, r, e+1-at); err != nil {
			return fmt.Errorf("read bytes %d-%d: %w", s, e, err)
		}
		return nil
	}
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     blobPath(repo, dgst),
		scope:    repo.scope(),
		header:   http.Header{"Range": {spec.String()}},
		accept:   []int{http.StatusOK, http.StatusPartialContent},
		timeout:  c.opts.RangeTimeout,
		read: func(resp *http.Response) error {
			if resp.StatusCode != http.StatusPartialContent {
				c.setNoMultiRange(repo.Registry)
				return fmt.Errorf("%w: the registry answered a multi-range request with the whole blob", ErrUnsupported)
			}
			mt, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
			if err != nil || mt != "multipart/byteranges" {
				// One part: the registry joined the ranges, or one was asked.
				return readPart(resp.Body, resp.Header.Get("Content-Range"))
			}
			mr := multipart.NewReader(resp.Body, params["boundary"])
			for {
				part, err := mr.NextPart()
				if err == io.EOF {
					return nil
				}
				if err != nil {
					return fmt.Errorf("read multipart/byteranges: %w", err)
				}
				if err := readPart(part, part.Header.Get("Content-Range")); err != nil {
					return err
				}
			}
		},
	})
	if err != nil {
		return fmt.Errorf("read ranges of blob %s: %w", dgst, err)
	}
	if left > 0 {
		return fmt.Errorf("read ranges of blob %s: %w: %d of %d ranges missing from the response", dgst, ErrInvalidResponse, left, len(ranges))
	}
	return nil
}

// noMultiRange reports whether registry answered a multi-range request
// with the whole blob before; setNoMultiRange records that it did.
func (c *Client) noMultiRange(registry string) bool {
	_, ok := c.singleRange.Load(registry)
	return ok
}

func (c *Client) setNoMultiRange(registry string) { c.singleRange.Store(registry, true) }
