package node

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/layerindex"
)

// GCReport is what a removal of images or a collection freed on the node.
type GCReport struct {
	// Layers removed, and their bytes on disk (indexes and unpacked
	// trees).
	Layers     int   `json:"layers"`
	LayerBytes int64 `json:"layerBytes"`
	// Cache items (frames, files) that only those layers named.
	CacheItems int   `json:"cacheItems"`
	CacheBytes int64 `json:"cacheBytes"`
}

// GC removes every layer no pulled image, lease or mount uses, and the
// cache items only they named (strata gc).
func (m *Manager) GC(ctx context.Context) (*GCReport, error) {
	return m.collect(ctx, nil)
}

// collect removes the layers of candidates (nil: all layers) that nothing
// uses any more, with their cache items. Pulls and leases wait meanwhile
// (gcMu), so that none of them sees a layer go that it has just saved.
func (m *Manager) collect(ctx context.Context, candidates []digest.Digest) (*GCReport, error) {
	m.gcMu.Lock()
	defer m.gcMu.Unlock()
	rep := &GCReport{}
	used := map[digest.Digest]bool{}
	imgs, err := m.Images()
	if err != nil {
		return nil, err
	}
	for _, img := range imgs {
		for _, l := range img.Layers {
			used[l.Digest] = true
		}
	}
	var consider map[digest.Digest]bool
	if candidates != nil {
		consider = map[digest.Digest]bool{}
		for _, d := range candidates {
			consider[d] = true
		}
	}
	m.mu.Lock()
	for _, l := range m.leases {
		if l.Image != nil {
			for _, ld := range l.Image.Layers {
				used[ld.Digest] = true
			}
		}
	}
	var lingering []*layer
	for d, l := range m.layers {
		switch {
		case l.refs == 0 && !used[d] && (consider == nil || consider[d]):
			// Kept mounted for a start that may come (Options.Linger):
			// it will not, the layer goes.
			lingering = append(lingering, l)
		default: // mounted (by leases, or the snapshotter)
			used[d] = true
		}
	}
	m.mu.Unlock()
	for _, l := range lingering {
		m.mu.Lock()
		if l.refs > 0 || m.layers[l.digest] != l {
			used[l.digest] = true
			m.mu.Unlock()
			continue
		}
		if l.linger != nil {
			l.linger.Stop()
			l.linger = nil
		}
		m.unmountLocked(l) // releases m.mu
	}
	dirs, _ := filepath.Glob(filepath.Join(m.root, "layers", "*"))
	gone := map[digest.Digest]bool{} // cache items of removed layers
	var kept []digest.Digest
	for _, dir := range dirs {
		d, ok := dirDigest(filepath.Base(dir))
		if !ok {
			continue
		}
		if used[d] || (consider != nil && !consider[d]) {
			kept = append(kept, d)
			continue
		}
		for _, c := range m.layerCacheItems(d) {
			gone[c] = true
		}
		size := diskUsage(dir)
		if err := os.RemoveAll(dir); err != nil {
			m.log.Warn("gc: remove layer", "layer", d, "err", err)
			continue
		}
		m.log.Info("gc: layer removed", "layer", d, "bytes", size)
		rep.Layers++
		rep.LayerBytes += size
	}
	if len(gone) > 0 {
		// Items other layers name stay (files shared between layers).
		for _, d := range kept {
			for _, c := range m.layerCacheItems(d) {
				delete(gone, c)
			}
		}
		for c := range gone {
			if n := m.cache.Remove(c); n > 0 {
				rep.CacheItems++
				rep.CacheBytes += n
			}
		}
	}
	m.reserveUnpacked()
	return rep, nil
}

// layerCacheItems lists the digests of the cache items a lazy layer's
// frames and files may have: none for an unpacked layer.
func (m *Manager) layerCacheItems(d digest.Digest) []digest.Digest {
	raw, err := m.savedIndex(d)
	if err != nil {
		return nil
	}
	ix, err := layerindex.Decode(raw)
	if err != nil {
		return nil
	}
	out := make([]digest.Digest, 0, len(ix.Frames)+len(ix.Entries))
	for _, f := range ix.Frames {
		out = append(out, f.Digest)
	}
	for _, e := range ix.Entries {
		if e.Digest != "" {
			out = append(out, e.Digest)
		}
	}
	return out
}

// diskUsage is the bytes of the files below dir.
func diskUsage(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if de.Type().IsRegular() {
			if fi, err := de.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// unpackedSize returns the bytes of the unpacked layer in dir, recorded
// when it was unpacked (measured once for layers unpacked before).
func unpackedSize(dir string) int64 {
	p := filepath.Join(dir, "unpacked-size")
	if b, err := os.ReadFile(p); err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil {
			return n
		}
	}
	n := diskUsage(filepath.Join(dir, "fs"))
	os.WriteFile(p, []byte(strconv.FormatInt(n, 10)), 0o644)
	return n
}

// unpackedBytes is the bytes of all unpacked layers of the node.
func (m *Manager) unpackedBytes() int64 {
	var n int64
	dirs, _ := filepath.Glob(filepath.Join(m.root, "layers", "*"))
	for _, dir := range dirs {
		if _, err := os.Stat(filepath.Join(dir, "unpacked")); err == nil {
			n += unpackedSize(dir)
		}
	}
	return n
}

// reserveUnpacked counts the unpacked layers against the node's disk
// budget (--cache-size): the cache holds that much less.
func (m *Manager) reserveUnpacked() {
	m.cache.SetReserved(m.unpackedBytes())
}
