package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/startup"
	"github.com/strata-oci/strata/layerindex"
)

// layer is a mounted layer.
type layer struct {
	digest digest.Digest
	mode   string
	dir    string // what overlay uses as a lower
	refs   int
	fs     *layerfs.FS // lazy layers: the file system and its mount
	mnt    LayerMount
	size   int64             // compressed layer size
	usize  int64             // uncompressed bytes of file data
	repo   remote.Repository // lazy layers: where the frames come from

	ready chan struct{} // closed when mounted, or when mounting failed (err)
	err   error

	// While containers start, the kernel's readahead on a lazy layer is
	// narrowed (narrowReadahead) until raTimer restores raDefault.
	raTimer   *time.Timer
	raDefault int

	// linger unmounts a lazy layer no lease uses any more, unless a
	// container takes it again first (Options.Linger).
	linger *time.Timer
}

// ref mounts layer d of img (once) and takes a reference. Concurrent
// calls for the same layer wait for the one that mounts it. The layer's
// frames that profile p lists are prefetched (before the FUSE mount when
// this call mounts it).
func (m *Manager) ref(ctx context.Context, img *Image, d ocispec.Descriptor, p *api.Profile) (*layer, error) {
	m.mu.Lock()
	if l, ok := m.layers[d.Digest]; ok {
		l.refs++
		if l.linger != nil {
			l.linger.Stop()
			l.linger = nil
		}
		m.mu.Unlock()
		select {
		case <-l.ready:
		case <-ctx.Done():
			m.unref(l)
			return nil, ctx.Err()
		}
		if l.err != nil {
			return nil, l.err
		}
		if p != nil && l.fs != nil {
			l.fs.Prefetch(m.starts.Frames(p, l.repo, l.digest, l.fs.Index().Data))
		}
		return l, nil
	}
	l := &layer{digest: d.Digest, refs: 1, size: d.Size, ready: make(chan struct{})}
	m.layers[d.Digest] = l
	m.mu.Unlock()
	if err := m.mountLayer(ctx, img, d, l, p); err != nil {
		m.mu.Lock()
		if m.layers[d.Digest] == l {
			delete(m.layers, d.Digest)
		}
		m.mu.Unlock()
		l.err = err
		close(l.ready)
		return nil, err
	}
	close(l.ready)
	return l, nil
}

// mountLayer makes layer l ready: its unpacked tree, or a FUSE mount of its
// saved index.
func (m *Manager) mountLayer(ctx context.Context, img *Image, d ocispec.Descriptor, l *layer, p *api.Profile) error {
	dir := layerDir(m.root, d.Digest)
	if _, err := os.Stat(filepath.Join(dir, "unpacked")); err == nil {
		m.mu.Lock()
		l.mode, l.dir = ModeUnpacked, filepath.Join(dir, "fs")
		m.mu.Unlock()
		return nil
	}
	if err := m.refused(d.Digest); err != nil {
		// Never mounted lazily again: pulled whole (Acquire pulls again).
		m.mu.Lock()
		delete(m.decoded, d.Digest)
		m.mu.Unlock()
		return fmt.Errorf("layer %s: %w: %w", d.Digest, errNotPulled, err)
	}
	m.mu.Lock()
	ix := m.decoded[d.Digest] // just pulled: no need to read and decode it again
	delete(m.decoded, d.Digest)
	m.mu.Unlock()
	if ix == nil {
		b, err := m.savedIndex(d.Digest)
		if err != nil {
			return fmt.Errorf("layer %s: %w: %w", d.Digest, errNotPulled, err)
		}
		if ix, err = layerindex.Decode(b); err != nil {
			return fmt.Errorf("layer %s: saved index: %w", d.Digest, err)
		}
	}
	if ix.Layer != d.Digest {
		return fmt.Errorf("layer %s: saved index is for %s", d.Digest, ix.Layer)
	}
	mnt := filepath.Join(dir, "mnt")
	m.mounter.Unmount(mnt, true) // a stale mount from a crashed daemon
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return err
	}
	repo := remote.Repository{Registry: img.Registry, Name: img.Repo}
	fs, err := layerfs.New(ix, m.starts.Source(repo, ix.Data), m.cache, layerfs.Options{
		Logger: m.log, FetchTimeout: m.opts.FetchTimeout, AttemptTimeout: attemptTimeout(m.opts.FetchTimeout),
		Prefetch: m.starts.Frames(p, repo, d.Digest, ix.Data), Profiled: p != nil,
		Completer: m.complete, ReadMiss: m.metrics.missed,
	})
	if err != nil {
		return fmt.Errorf("layer %s: %w", d.Digest, err)
	}
	lm, err := m.mounter.MountLayer(ctx, mnt, fs)
	if err != nil {
		fs.Close()
		return fmt.Errorf("mount layer %s: %w", d.Digest, err)
	}
	m.mu.Lock()
	l.mode, l.dir, l.fs, l.mnt, l.usize, l.repo = ModeLazy, mnt, fs, lm, ix.StreamSize, repo
	m.mu.Unlock()
	m.log.Info("layer mounted", "layer", d.Digest, "entries", len(ix.Entries))
	m.queueVerify(l, ix)
	return nil
}

// narrowReadahead sets the kernel's readahead on lazy layer l to
// startupReadaheadKB for startupWindow (from the last container start),
// then back to what it was. acquire does so for a start that records a
// start-up profile or prefetches one the node does not have yet: the two
// must read alike, since a start-up pack holds exactly the bytes the
// recording read. A process that starts maps its programs and libraries,
// and the kernel reads its readahead window around every page fault: 128
// KiB by default, which makes a start read (and its profile list, and
// every later start fetch) pages it never touches. gcc's start read 23 MB
// at 32 KiB, 14 MB at 4 KiB; but each read is a request to this process,
// and fewer, larger ones start the 24-layer image faster. Measured on the
// regional link (5 runs, medians), 32/16/8/4 KiB: gcc 1.05/0.94/0.88/0.89
// s, python 372/326/320/393 ms, the 24-layer image 483/485/527/640 ms.
// Later reads, sequential ones of big files above all, get the default
// back.
func (m *Manager) narrowReadahead(l *layer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l.mnt == nil {
		return
	}
	if l.raTimer == nil {
		old, err := l.mnt.SetReadahead(startupReadaheadKB)
		if err != nil {
			m.log.Debug("readahead not narrowed", "layer", l.digest, "err", err)
			return
		}
		l.raDefault = old
	} else {
		l.raTimer.Stop()
	}
	lm := l.mnt
	var t *time.Timer
	t = time.AfterFunc(startupWindow, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		// Not when a later start replaced this timer while it fired.
		if l.mnt == lm && l.raTimer == t {
			lm.SetReadahead(l.raDefault)
			l.raTimer = nil
		}
	})
	l.raTimer = t
}

// startupReadaheadKB and startupWindow: see narrowReadahead.
const (
	startupReadaheadKB = 16
	startupWindow      = 10 * time.Second
)

func (m *Manager) unref(l *layer) {
	m.mu.Lock()
	l.refs--
	if l.refs > 0 {
		m.mu.Unlock()
		return
	}
	if m.opts.Linger > 0 && l.mnt != nil && m.layers[l.digest] == l {
		var t *time.Timer
		t = time.AfterFunc(m.opts.Linger, func() {
			m.mu.Lock()
			if l.linger != t || l.refs > 0 {
				m.mu.Unlock()
				return
			}
			l.linger = nil
			m.unmountLocked(l)
		})
		l.linger = t
		m.mu.Unlock()
		return
	}
	m.unmountLocked(l)
}

// unmountLocked forgets layer l, which no lease uses, and unmounts it.
// m.mu is held; it is released.
func (m *Manager) unmountLocked(l *layer) {
	if m.layers[l.digest] == l {
		delete(m.layers, l.digest)
		m.retire(l)
	}
	delete(m.detached, l)
	if l.raTimer != nil {
		l.raTimer.Stop()
		l.raTimer = nil
	}
	m.mu.Unlock()
	if l.mnt != nil {
		st := l.fs.Stats()
		m.addFetched(l.digest, st.BytesFetched)
		m.log.Debug("layer unmounted", "layer", l.digest, "fetched_bytes", st.BytesFetched, "fetched_frames", st.FramesFetched,
			"requests", st.Requests, "page_reads", st.PageReads, "served_reads", st.ServedReads, "cache_hits", st.CacheHits)
		m.unmountLayer(l)
	}
}

// prefetchMounted prefetches frames of layer (with data blob data) if it
// is mounted from repo (startup.Options.Prefetch: a start-up pack failed).
func (m *Manager) prefetchMounted(repo remote.Repository, layer, data digest.Digest, frames []int) {
	m.mu.Lock()
	l := m.layers[layer]
	m.mu.Unlock()
	if l == nil {
		return // not mounted yet: mounting prefetches the frames
	}
	select {
	case <-l.ready:
	default:
		return
	}
	if l.fs != nil && l.repo == repo && l.fs.Index().Data == data {
		l.fs.Prefetch(frames)
	}
}

// addFetched adds n to the bytes fetched for layer d by unmounted servers,
// kept in the layer's directory so `strata df` reports them later.
func (m *Manager) addFetched(d digest.Digest, n int64) {
	if n == 0 {
		return
	}
	m.fetchedMu.Lock()
	defer m.fetchedMu.Unlock()
	total := m.fetchedBefore(d) + n
	atomicfile.Write(filepath.Join(layerDir(m.root, d), "fetched"), []byte(strconv.FormatInt(total, 10)))
}

func (m *Manager) fetchedBefore(d digest.Digest) int64 {
	b, err := os.ReadFile(filepath.Join(layerDir(m.root, d), "fetched"))
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n
}

// ErrNoLayerMount reports that a layer cannot be served as a layer mount
// (the registry offers none, or refuses this layer); the caller pulls the
// layer the ordinary way.
var ErrNoLayerMount = errors.New("no layer mount")

// Resolve resolves ref to one platform's manifest and config, without
// recording an image. It is for callers that manage images themselves (the
// containerd snapshotter), one layer at a time with MountLayer.
func (m *Manager) Resolve(ctx context.Context, ref remote.Reference) (*remote.Image, error) {
	return m.client.Resolve(ctx, ref)
}

// MountLayer mounts one layer of the image whose manifest is manifest in
// repo as a layer mount (FUSE, shared and refcounted with every other user
// of the layer) and returns the directory to use as an overlay lower. The
// layer's index is fetched once, from the registry's layer mounts or else
// an expansion referrer of manifest, and bound to l and diffID, as for
// Pull. Every successful call holds one reference, which release drops
// (the layer is unmounted with its last reference); release may be called
// more than once.
//
// A layer without either, or one the registry cannot expand, is an error
// wrapping ErrNoLayerMount whose text says why. A layer this node already
// unpacked (a fallback Pull) is returned as its unpacked tree.
func (m *Manager) MountLayer(ctx context.Context, repo remote.Repository, manifest digest.Digest, l ocispec.Descriptor, diffID digest.Digest) (dir string, release func(), err error) {
	m.busy() // a container is about to start
	// A layer whose index this node holds is mounted without asking the
	// registry (a restarted snapshotter restores its snapshots offline);
	// not one whose expansion failed verification, unless it is unpacked.
	ldir := layerDir(m.root, l.Digest)
	_, unpacked := os.Stat(filepath.Join(ldir, "unpacked"))
	if _, err := os.Stat(filepath.Join(ldir, "index")); err != nil || unpacked != nil && m.refused(l.Digest) != nil {
		if err := m.fetchLayerIndex(ctx, repo, manifest, l, diffID); err != nil {
			return "", nil, err
		}
	}
	profile := m.mountProfile(ctx, repo, manifest)
	ly, err := m.ref(ctx, &Image{Registry: repo.Registry, Repo: repo.Name}, l, profile)
	if err != nil {
		return "", nil, err
	}
	if profile != nil && ly.fs != nil {
		m.log.Info("layer mounted with its image's start-up profile", "layer", l.Digest, "manifest", manifest,
			"frames", len(startup.ProfileFrames(profile, l.Digest, ly.fs.Index().Data)))
	}
	var once sync.Once
	return ly.dir, func() { once.Do(func() { m.unref(ly) }) }, nil
}

// fetchLayerIndex fetches, binds and saves layer l's index for MountLayer:
// from the layer-mount API, or an expansion referrer of manifest.
func (m *Manager) fetchLayerIndex(ctx context.Context, repo remote.Repository, manifest digest.Digest, l ocispec.Descriptor, diffID digest.Digest) error {
	lazy, reason := m.offersMounts(ctx, repo.Registry)
	if lazy {
		err := m.fetchIndex(ctx, repo, l, diffID)
		if errors.Is(err, remote.ErrExpansionFailed) || errors.Is(err, remote.ErrNotFound) || errors.Is(err, errNotBound) {
			m.metrics.fallback(layerFallback(err))
			return fmt.Errorf("%w: %w", ErrNoLayerMount, err)
		}
		return err
	}
	if manifest == "" {
		m.metrics.fallback(fallbackNoLayerMounts)
		return fmt.Errorf("layer %s: %w: %s", l.Digest, ErrNoLayerMount, reason)
	}
	exps, err := m.expansionOf(ctx, repo, manifest)
	if err != nil {
		m.metrics.fallback(fallbackReferrersFailed)
		return fmt.Errorf("layer %s: %w: %s; looking for an expansion referrer failed: %w", l.Digest, ErrNoLayerMount, reason, err)
	}
	if _, ok := exps[l.Digest]; !ok {
		m.metrics.fallback(fallbackNoReferrer)
		return fmt.Errorf("layer %s: %w: %s and no expansion referrer of %s lists it", l.Digest, ErrNoLayerMount, reason, manifest)
	}
	md, raw, ix, err := m.getReferredIndex(ctx, repo, l, exps)
	if err == nil && raw != nil {
		err = m.saveIndex(l, diffID, md, raw, ix)
	}
	if errors.Is(err, errNotBound) || errors.Is(err, remote.ErrNotFound) {
		m.log.Warn("refusing an expansion that is not the layer's", "layer", l.Digest, "err", err)
		m.metrics.fallback(layerFallback(err))
		return fmt.Errorf("%w: %w", ErrNoLayerMount, err)
	}
	return err
}

// expansionOf is findExpansion for MountLayer, which is called once per
// layer of an image: the answer for a manifest is kept a minute.
func (m *Manager) expansionOf(ctx context.Context, repo remote.Repository, manifest digest.Digest) (map[digest.Digest]api.LayerExpansion, error) {
	k := repo.String() + "@" + manifest.String()
	m.mu.Lock()
	c, ok := m.expansions[k]
	m.mu.Unlock()
	if ok && time.Since(c.at) < time.Minute {
		return c.exps, nil
	}
	exps, err := m.findExpansion(ctx, repo, manifest)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	for k, c := range m.expansions {
		if time.Since(c.at) >= time.Minute {
			delete(m.expansions, k)
		}
	}
	m.expansions[k] = cachedExpansion{exps: exps, at: time.Now()}
	m.mu.Unlock()
	return exps, nil
}

// OffersMounts reports whether registry serves layer mounts (asked once and
// remembered), and if not, why.
func (m *Manager) OffersMounts(ctx context.Context, registry string) (bool, string) {
	return m.offersMounts(ctx, registry)
}

type cachedExpansion struct {
	exps map[digest.Digest]api.LayerExpansion
	at   time.Time
}

// unmountLayer unmounts lazy layer l and closes its file system; a mount
// still in use is detached instead, and its file system serves the users
// it has until they leave.
func (m *Manager) unmountLayer(l *layer) {
	if err := l.mnt.Unmount(); err != nil {
		m.log.Warn("layer unmount", "layer", l.digest, "err", err)
		m.mounter.Unmount(l.dir, true)
		return
	}
	l.fs.Close()
}
