package node

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/remote"
)

// LayerUsage is one layer's line of `strata df`.
type LayerUsage struct {
	Digest string `json:"digest"`
	Mode   string `json:"mode"`
	// Mounted layers are in use by Refs leases.
	Mounted bool `json:"mounted"`
	Refs    int  `json:"refs"`
	// Total is the size of what a full fetch would transfer: the expanded
	// data blob for lazy layers, the layer blob for unpacked ones.
	Total int64 `json:"total"`
	// Fetched is what the node fetched of it from the registry.
	Fetched int64 `json:"fetched"`
}

// DFReport is what `strata df` shows.
type DFReport struct {
	Layers     []LayerUsage `json:"layers"`
	CacheBytes int64        `json:"cacheBytes"`
	CacheLimit int64        `json:"cacheLimit"`
	CacheItems int          `json:"cacheItems"`
	// UnpackedBytes is the disk of the unpacked (fallback) layers, which
	// counts against the same budget as the cache (CacheLimit).
	UnpackedBytes int64 `json:"unpackedBytes"`
	// Background is what the node's background completion of files read
	// from lazy layers did (nil when it is off).
	Background *layerfs.CompleterStats `json:"background,omitempty"`
}

// DF reports per-layer bytes fetched against totals, and cache use.
func (m *Manager) DF() *DFReport {
	r := &DFReport{}
	dirs, _ := filepath.Glob(filepath.Join(m.root, "layers", "*"))
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, dir := range dirs {
		d, ok := dirDigest(filepath.Base(dir))
		if !ok {
			continue
		}
		u := LayerUsage{Digest: d.String()}
		if b, err := os.ReadFile(filepath.Join(dir, "mount.json")); err == nil {
			var md api.MountDescriptor
			if json.Unmarshal(b, &md) == nil {
				u.Mode, u.Total = ModeLazy, md.Data.Size
			}
		} else if _, err := os.Stat(filepath.Join(dir, "unpacked")); err == nil {
			u.Mode = ModeUnpacked
			u.Total = unpackedSize(dir)
			u.Fetched = u.Total
			r.UnpackedBytes += u.Total
		} else {
			continue
		}
		if u.Mode == ModeLazy {
			u.Fetched = m.fetchedBefore(d)
		}
		if l, ok := m.layers[d]; ok {
			u.Mounted, u.Refs = true, l.refs
			if l.mode == ModeUnpacked {
				u.Total, u.Fetched = l.size, l.size
			}
			if l.fs != nil {
				u.Fetched += l.fs.Stats().BytesFetched
			}
		}
		r.Layers = append(r.Layers, u)
	}
	sort.Slice(r.Layers, func(i, j int) bool { return r.Layers[i].Digest < r.Layers[j].Digest })
	st := m.cache.Stats()
	r.CacheBytes, r.CacheLimit, r.CacheItems = st.Bytes, m.opts.CacheSize, st.Items
	if m.complete != nil {
		bg := m.complete.Stats()
		r.Background = &bg
	}
	return r
}

// completing reports whether files are being completed into the cache in
// the background (see Options.CompleteMax).
func (m *Manager) completing() bool {
	return m.complete != nil && m.complete.Stats().Pending > 0
}

// Busy reports whether the node has work of its own under way that a
// daemon must not exit under: files being completed in the background,
// lazy layers waiting for verification.
func (m *Manager) Busy() bool { return m.completing() || m.verify != nil && m.verify.pending() }

// busy notes that a pull or a start is under way: the node's background
// work (completion, verification) waits until it has been quiet a while.
func (m *Manager) busy() {
	if m.complete != nil {
		m.complete.Busy()
	}
	if m.verify != nil {
		m.verify.busy()
	}
}

// VerifyIdle returns a channel closed once no lazy layer waits for
// background verification (Options.VerifyLayers).
func (m *Manager) VerifyIdle() <-chan struct{} {
	if m.verify == nil {
		return closedChan
	}
	return m.verify.idle()
}

// Hosts is how the node reaches registries; a request that asks for plain
// HTTP marks its registry here.
func (m *Manager) Hosts() *remote.Hosts { return m.client.Hosts() }
