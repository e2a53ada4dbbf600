package startup

import (
	"context"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/remote"
)

// Source returns the source of data blob d of a layer mounted from repo:
// it serves reads from the early fetches and the start-up pack of the
// profiles at work, and from the registry otherwise (ranged GETs).
func (s *Profiles) Source(repo remote.Repository, d digest.Digest) layerfs.Source {
	return &source{s: s, repo: repo, digest: d}
}

// source is a layerfs.PendingSource and PageSource.
type source struct {
	s      *Profiles
	repo   remote.Repository
	digest digest.Digest
}

var (
	_ layerfs.PendingSource = (*source)(nil)
	_ layerfs.PageSource    = (*source)(nil)
)

// Pending reports whether bytes [off, off+n) of the blob are on their way
// already (an early fetch), so reading them costs no request of its own.
func (b *source) Pending(off, n int64) bool {
	eb := b.s.earlyFor(b.digest)
	return eb != nil && eb.covers(frames.Span{Off: off, Len: n})
}

// ReadPages fills dest with bytes [off, off+len(dest)) of the layer's
// uncompressed stream from the start-up pack in use, if it holds them.
func (b *source) ReadPages(ctx context.Context, dest []byte, off int64) bool {
	pl := b.s.packFor(b.repo, b.digest)
	return pl != nil && pl.read(ctx, dest, off)
}

// CoversPages reports whether the start-up pack in use holds bytes [off,
// off+n) of the layer's uncompressed stream.
func (b *source) CoversPages(off, n int64) bool {
	pl := b.s.packFor(b.repo, b.digest)
	return pl != nil && pl.covers(frames.Span{Off: off, Len: n})
}

// Await returns when the early pieces holding bytes [off, off+n) have
// arrived or failed, or ctx is done.
func (b *source) Await(ctx context.Context, off, n int64) {
	if eb := b.s.earlyFor(b.digest); eb != nil {
		eb.await(ctx, frames.Span{Off: off, Len: n})
	}
}

func (b *source) ReadAt(ctx context.Context, off, n int64) ([]byte, error) {
	if eb := b.s.earlyFor(b.digest); eb != nil {
		if data, ok := eb.read(ctx, frames.Span{Off: off, Len: n}); ok {
			return data, nil
		}
	}
	return b.s.client.ReadRange(ctx, b.repo, b.digest, off, n)
}
