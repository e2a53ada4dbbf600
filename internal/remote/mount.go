package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/layerindex"
)

const maxInfoSize = 1 << 20

// Info asks a registry whether it offers strata layer mounts (GET
// /v2/_strata/info). It returns true with the registry's info on 200 with
// valid JSON; any other answer (404, 401, a bad body, a status still failing
// after retries) is false with no error, and the caller pulls the ordinary
// way. The error is for a registry that could not be reached at all.
func (c *Client) Info(ctx context.Context, registry string) (*api.Info, bool, error) {
	var info api.Info
	var decodeErr error
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: registry,
		path:     api.InfoPath,
		header:   http.Header{"Accept": {"application/json"}},
		read: func(resp *http.Response) error {
			b, err := io.ReadAll(io.LimitReader(resp.Body, maxInfoSize))
			if err != nil {
				return err
			}
			decodeErr = json.Unmarshal(b, &info)
			return nil
		},
	})
	var re *Error
	switch {
	case errors.As(err, &re):
		c.log.DebugContext(ctx, "registry offers no layer mounts", "registry", registry, "err", err)
		return nil, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("layer-mount info of %s: %w", registry, err)
	case decodeErr != nil:
		c.log.WarnContext(ctx, "registry's layer-mount info is not valid JSON; not using layer mounts",
			"registry", registry, "err", decodeErr)
		return nil, false, nil
	}
	return &info, true, nil
}

// Mount asks the registry for the expanded form of layer in repo (POST
// /v2/<name>/_strata/layers/<digest>/mount). While the registry expands it
// (202), Mount waits as Retry-After asks, within Options.MountWait, then
// fails with ErrExpanding. A layer not in the repository is ErrNotFound; one
// the registry cannot expand is ErrExpansionFailed (an *Error carrying the
// registry's message). The descriptor returned names layer.
func (c *Client) Mount(ctx context.Context, repo Repository, layer digest.Digest) (*api.MountDescriptor, error) {
	md, err := c.mount(ctx, repo, layer)
	if err != nil {
		return nil, fmt.Errorf("layer mount %s@%s: %w", repo, layer, err)
	}
	return md, nil
}

func (c *Client) mount(ctx context.Context, repo Repository, layer digest.Digest) (*api.MountDescriptor, error) {
	var md api.MountDescriptor
	err := c.whileExpanding(ctx, repo, layer, request{
		method:   http.MethodPost,
		registry: repo.Registry,
		path:     api.MountPath(repo.Name, layer),
		need:     CapPull, // asks for a mount, writes nothing
		scope:    repo.scope(),
		header:   http.Header{"Accept": {"application/json"}},
		read: func(resp *http.Response) error {
			b, err := io.ReadAll(io.LimitReader(resp.Body, maxInfoSize))
			if err != nil {
				return err
			}
			if err := json.Unmarshal(b, &md); err != nil {
				return fmt.Errorf("%w: mount descriptor: %v", ErrInvalidResponse, err)
			}
			return nil
		},
	})
	if err != nil {
		return nil, err
	}
	if err := checkMountDescriptor(&md, layer); err != nil {
		return nil, err
	}
	return &md, nil
}

// whileExpanding sends r, a request about layer's expansion, again while
// the registry answers 202 (it is expanding the layer), as Retry-After
// asks, within Options.MountWait; then it fails with ErrExpanding. r.read
// sees only the final answer.
func (c *Client) whileExpanding(ctx context.Context, repo Repository, layer digest.Digest, r request) error {
	if err := layer.Validate(); err != nil {
		return err
	}
	read := r.read
	r.accept = []int{http.StatusOK, http.StatusAccepted}
	start := time.Now()
	for poll := 1; ; poll++ {
		var (
			pending bool
			after   string
		)
		r.read = func(resp *http.Response) error {
			if resp.StatusCode == http.StatusAccepted {
				pending, after = true, resp.Header.Get("Retry-After")
				return nil
			}
			return read(resp)
		}
		if _, err := c.send(ctx, r); err != nil {
			return err
		}
		if !pending {
			return nil
		}
		delay := c.backoff(poll, parseRetryAfter(after, time.Now()))
		if time.Since(start)+delay > c.opts.MountWait {
			return fmt.Errorf("%w after %s", ErrExpanding, time.Since(start).Round(time.Millisecond))
		}
		c.log.DebugContext(ctx, "layer is being expanded; waiting", "repo", repo, "layer", layer, "delay", delay)
		if err := sleep(ctx, delay); err != nil {
			return err
		}
	}
}

// MaxIndexBytes bounds an index LayerIndex accepts, decompressed; a
// compressed one may also not expand more than maxIndexRatio times (an
// index compresses about 1.4 times).
const (
	MaxIndexBytes = layerindex.MaxIndexSize
	maxIndexRatio = 16
)

// LayerIndex fetches the index of layer's expansion in repo with one
// request (GET /v2/<name>/_strata/layers/<digest>/index), compressed with
// zstd on the wire where the registry offers that, and verifies it
// against the digest the registry names for it. It waits for an expansion
// in progress and fails as Mount does. A registry without the route, or
// whose answer is malformed, is ErrUnsupported: ask with Mount, then read
// the index blob.
func (c *Client) LayerIndex(ctx context.Context, repo Repository, layer digest.Digest) (digest.Digest, []byte, error) {
	var (
		d   digest.Digest
		raw []byte
	)
	err := c.whileExpanding(ctx, repo, layer, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     api.IndexPath(repo.Name, layer),
		scope:    repo.scope(),
		header:   http.Header{"Accept-Encoding": {"zstd"}},
		read: func(resp *http.Response) error {
			var err error
			if d, err = digest.Parse(resp.Header.Get("Docker-Content-Digest")); err != nil {
				return fmt.Errorf("%w: index digest %q: %v", ErrInvalidResponse, resp.Header.Get("Docker-Content-Digest"), err)
			}
			var body io.Reader = resp.Body
			limit := int64(MaxIndexBytes)
			switch enc := resp.Header.Get("Content-Encoding"); enc {
			case "":
			case "zstd":
				in := &countingReader{r: resp.Body}
				zr, err := zstd.NewReader(in, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(limit)))
				if err != nil {
					return err
				}
				defer zr.Close()
				body = &ratioReader{r: zr, in: in}
			default:
				return fmt.Errorf("%w: index in Content-Encoding %q", ErrInvalidResponse, enc)
			}
			raw, err = io.ReadAll(io.LimitReader(body, limit+1))
			if err != nil {
				return fmt.Errorf("read index: %w", err)
			}
			if int64(len(raw)) > limit {
				return fmt.Errorf("%w: index larger than %d bytes", ErrInvalidResponse, limit)
			}
			return nil
		},
	})
	// Any failure of the route itself (it is missing, a proxy does not
	// route it, its answer is malformed) is ErrUnsupported, for the caller
	// to ask with Mount, whose answer is authoritative; a layer that is not
	// in the repository, cannot be expanded or is still expanding is not.
	if re := (*Error)(nil); errors.As(err, &re) && (re.StatusCode == http.StatusMethodNotAllowed || re.StatusCode == http.StatusNotFound && re.Code() != "BLOB_UNKNOWN") ||
		errors.Is(err, ErrInvalidResponse) && ctx.Err() == nil {
		return "", nil, fmt.Errorf("index of layer %s: %w: %w", layer, ErrUnsupported, err)
	}
	if err != nil {
		return "", nil, fmt.Errorf("index of layer %s@%s: %w", repo, layer, err)
	}
	if !d.Algorithm().Available() {
		return "", nil, fmt.Errorf("index of layer %s: %w: digest algorithm of %s", layer, ErrUnsupported, d)
	}
	if got := d.Algorithm().FromBytes(raw); got != d {
		return "", nil, fmt.Errorf("index of layer %s: %w: content is %s, the registry says %s", layer, ErrDigestMismatch, got, d)
	}
	return d, raw, nil
}

func checkMountDescriptor(md *api.MountDescriptor, layer digest.Digest) error {
	if md.Layer != layer {
		return fmt.Errorf("%w: mount descriptor is for layer %q", ErrInvalidResponse, md.Layer)
	}
	for _, d := range []struct {
		role string
		dg   digest.Digest
		size int64
	}{{"index", md.Index.Digest, md.Index.Size}, {"data", md.Data.Digest, md.Data.Size}} {
		if err := d.dg.Validate(); err != nil {
			return fmt.Errorf("%w: mount descriptor's %s digest %q: %v", ErrInvalidResponse, d.role, d.dg, err)
		}
		if d.size < 0 {
			return fmt.Errorf("%w: mount descriptor's %s size %d", ErrInvalidResponse, d.role, d.size)
		}
	}
	if md.DiffID != "" {
		if err := md.DiffID.Validate(); err != nil {
			return fmt.Errorf("%w: mount descriptor's diff ID %q: %v", ErrInvalidResponse, md.DiffID, err)
		}
	}
	return nil
}

// Profile fetches the start-up profile of the image whose manifest is m in
// repo (GET /v2/<name>/_strata/profiles/<m>). No profile is ErrNotFound.
func (c *Client) Profile(ctx context.Context, repo Repository, m digest.Digest) (*api.Profile, error) {
	var p api.Profile
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     api.ProfilePath(repo.Name, m),
		scope:    repo.scope(),
		header:   http.Header{"Accept": {"application/json"}},
		read: func(resp *http.Response) error {
			b, err := io.ReadAll(io.LimitReader(resp.Body, api.MaxProfileBytes+1))
			if err != nil {
				return err
			}
			if len(b) > api.MaxProfileBytes {
				return fmt.Errorf("%w: profile larger than %d bytes", ErrInvalidResponse, api.MaxProfileBytes)
			}
			if err := json.Unmarshal(b, &p); err != nil {
				return fmt.Errorf("%w: profile: %v", ErrInvalidResponse, err)
			}
			return nil
		},
	})
	if err != nil {
		return nil, fmt.Errorf("start-up profile of %s@%s: %w", repo, m, err)
	}
	return &p, nil
}

// PutProfile stores p as the start-up profile of the image whose manifest
// is m in repo (PUT /v2/<name>/_strata/profiles/<m>); the registry
// authorizes it as a push to repo. Like every strata route, it is sent to
// the first host of the registry that may be asked to pull (a strata
// mirror in hosts.toml takes the profiles of what it serves).
func (c *Client) PutProfile(ctx context.Context, repo Repository, m digest.Digest, p *api.Profile) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	_, err = c.send(ctx, request{
		method:   http.MethodPut,
		registry: repo.Registry,
		path:     api.ProfilePath(repo.Name, m),
		// strata's own route: it goes where layer mounts come from, a
		// strata mirror included, not only to hosts that take pushes.
		need:   CapPull,
		scope:  "repository:" + repo.Name + ":pull,push",
		header: http.Header{"Content-Type": {"application/json"}},
		body:   b,
		accept: []int{http.StatusCreated, http.StatusOK},
		read:   func(*http.Response) error { return nil },
	})
	if err != nil {
		return fmt.Errorf("store start-up profile of %s@%s: %w", repo, m, err)
	}
	return nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// A ratioReader fails once what it has read from r (a decompressor) is
// more than maxIndexRatio times what the decompressor read from in, plus
// 64 KiB: a small body may not expand into a huge one.
type ratioReader struct {
	r  io.Reader
	in *countingReader
	n  int64
}

func (z *ratioReader) Read(p []byte) (int, error) {
	n, err := z.r.Read(p)
	z.n += int64(n)
	if z.n > maxIndexRatio*z.in.n+64<<10 {
		return n, fmt.Errorf("%w: index expands more than %d times", ErrInvalidResponse, maxIndexRatio)
	}
	return n, err
}
