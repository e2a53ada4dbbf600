package node

import (
	"context"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
)

// An earlyBlob holds parts of a data blob fetched, from a start-up
// profile's ranges, before the layer's index arrived. The layer's reads
// take them from here (blobSource) instead of asking the registry again;
// the layer file system verifies them against the index like any bytes.
type earlyBlob struct {
	pieces []*earlyPiece // by offset
}

type earlyPiece struct {
	off, n int64
	done   chan struct{}
	b      []byte
	err    error
}

// earlyPieceMax bounds one early request; earlyStreams the requests in
// flight for one blob.
const (
	earlyPieceMax = 1 << 20
	earlyStreams  = 6
	earlyKeep     = time.Minute
)

// fetchEarly starts fetching the ranges profile layer pl lists from the
// data blob in repo, first-wanted first, and keeps them for earlyKeep.
func (m *Manager) fetchEarly(repo remote.Repository, pl api.ProfileLayer) {
	if len(pl.Ranges) == 0 || len(pl.Ranges) != len(pl.Frames) {
		return
	}
	m.mu.Lock()
	if _, ok := m.early[pl.Data]; ok {
		m.mu.Unlock()
		return
	}
	rank := make(map[int64]int, len(pl.Ranges))
	rs := make([][2]int64, 0, len(pl.Ranges))
	for i, r := range pl.Ranges {
		if _, seen := rank[r[0]]; !seen && r[1] > 0 {
			rank[r[0]] = i
			rs = append(rs, r)
		}
	}
	slices.SortFunc(rs, func(a, b [2]int64) int { return int(a[0] - b[0]) })
	// Adjacent ranges join into pieces of at most earlyPieceMax bytes.
	eb := &earlyBlob{}
	first := map[*earlyPiece]int{}
	for _, r := range rs {
		if len(eb.pieces) > 0 {
			p := eb.pieces[len(eb.pieces)-1]
			if p.off+p.n == r[0] && p.n+r[1] <= earlyPieceMax {
				p.n += r[1]
				first[p] = min(first[p], rank[r[0]])
				continue
			}
			if p.off+p.n > r[0] {
				continue // overlapping ranges: not from a real index
			}
		}
		p := &earlyPiece{off: r[0], n: r[1], done: make(chan struct{})}
		eb.pieces = append(eb.pieces, p)
		first[p] = rank[r[0]]
	}
	m.early[pl.Data] = eb
	m.mu.Unlock()
	time.AfterFunc(earlyKeep, func() {
		m.mu.Lock()
		if m.early[pl.Data] == eb {
			delete(m.early, pl.Data)
		}
		m.mu.Unlock()
	})

	order := slices.Clone(eb.pieces)
	slices.SortStableFunc(order, func(a, b *earlyPiece) int { return first[a] - first[b] })
	queue := make(chan *earlyPiece, len(order))
	for _, p := range order {
		queue <- p
	}
	close(queue)
	for range min(earlyStreams, len(order)) {
		go func() {
			for p := range queue {
				ctx, cancel := context.WithTimeout(context.Background(), attemptTimeout(m.opts.FetchTimeout)+10*time.Second)
				p.b, p.err = m.client.ReadRange(ctx, repo, pl.Data, p.off, p.n)
				cancel()
				close(p.done)
			}
		}()
	}
}

// read returns bytes [off, off+n) of the blob if early pieces cover all of
// them, waiting for those pieces; ok is false when they do not, or one
// failed (the caller asks the registry).
func (eb *earlyBlob) read(ctx context.Context, off, n int64) (b []byte, ok bool) {
	i, _ := slices.BinarySearchFunc(eb.pieces, off, func(p *earlyPiece, off int64) int {
		switch {
		case p.off+p.n <= off:
			return -1
		case p.off > off:
			return 1
		}
		return 0
	})
	end := off + n
	var parts []*earlyPiece
	for at := off; at < end; {
		if i >= len(eb.pieces) || eb.pieces[i].off > at || eb.pieces[i].off+eb.pieces[i].n <= at {
			return nil, false
		}
		parts = append(parts, eb.pieces[i])
		at = eb.pieces[i].off + eb.pieces[i].n
		i++
	}
	out := make([]byte, 0, n)
	for _, p := range parts {
		select {
		case <-p.done:
		case <-ctx.Done():
			return nil, false
		}
		if p.err != nil || int64(len(p.b)) != p.n {
			return nil, false
		}
		lo := max(off, p.off) - p.off
		hi := min(end, p.off+p.n) - p.off
		out = append(out, p.b[lo:hi]...)
	}
	return out, true
}

// earlyFor returns the early pieces of data blob d, if any.
func (m *Manager) earlyFor(d digest.Digest) *earlyBlob {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.early[d]
}
