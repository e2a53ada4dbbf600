package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/unpack"
	"github.com/strata-oci/strata/layerindex"
)

// Pull resolves ref and makes every layer available: a layer mount when
// the registry offers one, else a download and unpack. It records the image.
// The registry is reached as the client's Hosts say.
func (m *Manager) Pull(ctx context.Context, ref string) (*Image, error) {
	r, err := remote.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	m.busy()
	// A collection does not remove layers this pull saves before its
	// image record is written.
	m.gcMu.RLock()
	defer m.gcMu.RUnlock()
	p := m.newPull(ctx, r)
	img, err := m.client.ResolveWith(ctx, r, p.ahead)
	if err != nil {
		return nil, err // it names the reference
	}
	if len(img.Config.RootFS.DiffIDs) != len(img.Manifest.Layers) {
		return nil, fmt.Errorf("image %s: config lists %d diff IDs for %d layers", ref, len(img.Config.RootFS.DiffIDs), len(img.Manifest.Layers))
	}
	rec := &Image{
		Ref: r.String(), Digest: img.Digest, Registry: r.Registry, Repo: r.Name,
		Config: img.Config, Layers: img.Manifest.Layers, Mode: ModeLazy, Pulled: time.Now().UTC(),
		PlainHTTP: m.client.Hosts().Lookup(r.Registry).PlainHTTP,
	}
	fallback, lazy, reason, err := p.bind(img)
	if err != nil {
		return nil, err
	}
	layers := img.Manifest.Layers
	errs := make([]error, len(fallback))
	forEach(ctx, len(fallback), downloadConcurrency, func(j int) {
		i := fallback[j]
		errs[j] = m.unpackLayer(ctx, r.Repository, layers[i], img.Config.RootFS.DiffIDs[i])
	})
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	<-p.profileDone
	rec.Profile, rec.Unprofiled = p.profile, p.unprofiled
	rec.Source = p.source
	if !lazy {
		rec.Mode, rec.Reason = ModeUnpacked, reason
		m.metrics.fallback(p.why)
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	if err := atomicfile.Write(imagePath(m.root, rec.Ref), b); err != nil {
		return nil, err
	}
	return rec, nil
}

// A pull is the part of a Pull that goes on while the image resolves. The
// requests that depend only on the manifest go out as soon as it is
// verified, alongside the config: whether the registry offers layer mounts
// (asked once per registry, from the start), the start-up profile, and
// every layer's index (a bounded number at a time), so a many-layer image
// costs no round trip per layer. The indexes are bound to the config's
// diff IDs once it is there (bind).
type pull struct {
	m     *Manager
	ctx   context.Context // the Pull's: every request of the pull ends with it
	ref   remote.Reference
	start time.Time
	offer func() (lazy bool, reason string)

	// source is where the layers' expansions come from (SourceMountAPI,
	// SourceReferrers, or "" for none, reason then says why), decided
	// once the manifest is verified; set when decided is closed.
	source  string
	reason  string
	why     string // reason as a fallback* constant (metrics)
	decided chan struct{}

	early []*earlyIndex // by layer, once the manifest is verified
	// profile and unprofiled are set when profileDone is closed.
	profile     *api.Profile
	unprofiled  bool
	profileDone chan struct{}
}

// newPull starts asking whether the registry offers layer mounts and opens
// the connections of the requests that follow the manifest, each on one
// of its own, while the manifest is on its way.
func (m *Manager) newPull(ctx context.Context, r remote.Reference) *pull {
	p := &pull{m: m, ctx: ctx, ref: r, start: time.Now(), profileDone: make(chan struct{}), decided: make(chan struct{})}
	p.offer = sync.OnceValues(func() (bool, string) { return m.offersMounts(ctx, r.Registry) })
	go p.offer()
	m.client.Preconnect(r.Registry, preconnect)
	return p
}

// ahead is called with the verified manifest (md, man), before the config
// is there: it starts fetching the start-up profile and the layers'
// indexes, in the background.
func (p *pull) ahead(md digest.Digest, man *ocispec.Manifest) {
	p.m.log.Debug("pull: manifest verified", "ref", p.ref, "after", time.Since(p.start))
	p.early = make([]*earlyIndex, len(man.Layers))
	for i := range p.early {
		p.early[i] = &earlyIndex{done: make(chan struct{})}
	}
	go p.fetchAhead(md, man.Layers)
}

// fetchAhead decides where the layers' expansions come from, then
// fetches the start-up profile (and starts its early fetch) and the
// layers' indexes.
func (p *pull) fetchAhead(md digest.Digest, layers []ocispec.Descriptor) {
	m, ctx := p.m, p.ctx
	var exps map[digest.Digest]api.LayerExpansion
	p.source, p.reason, exps = p.decide(md)
	close(p.decided)
	lazy := p.source != ""
	indexesIn := make(chan struct{})
	if !lazy || m.opts.Profiles == ProfilesOff {
		close(p.profileDone)
	} else {
		go func() {
			defer close(p.profileDone)
			// Its pack (or its frames) are fetched now, alongside the
			// indexes, not once they are there.
			p.profile, p.unprofiled = m.starts.Fetch(ctx, p.ref.Repository, md, layers, indexesIn, p.source == SourceReferrers)
			m.log.Debug("pull: start-up profile", "ref", p.ref, "after", time.Since(p.start), "found", p.profile != nil)
		}()
	}
	forEach(ctx, len(layers), pullConcurrency, func(i int) {
		e := p.early[i]
		defer close(e.done)
		switch {
		case p.source == SourceMountAPI:
			e.md, e.raw, e.ix, e.err = m.getIndex(ctx, p.ref.Repository, layers[i])
		case lazy:
			e.md, e.raw, e.ix, e.err = m.getReferredIndex(ctx, p.ref.Repository, layers[i], exps)
		default:
			return
		}
		m.log.Debug("pull: index", "layer", layers[i].Digest, "source", p.source, "after", time.Since(p.start), "err", e.err)
	})
	for _, e := range p.early { // those skipped when ctx ended
		select {
		case <-e.done:
		default:
			e.err = ctx.Err()
			close(e.done)
		}
	}
	close(indexesIn)
}

// decide says where the expansions of the layers of image manifest md
// come from: the registry's layer-mount API when it offers it, else an
// expansion artifact that refers to md (the Referrers API or the
// referrers tag), else nowhere (reason says why). The referrers are
// looked for while the registry is asked for layer mounts, unless it is
// known to offer them.
func (p *pull) decide(md digest.Digest) (source, reason string, exps map[digest.Digest]api.LayerExpansion) {
	m, ctx := p.m, p.ctx
	type found struct {
		exps map[digest.Digest]api.LayerExpansion
		err  error
	}
	var referred chan found
	if offers, known := m.knownOffer(p.ref.Registry); !(known && offers) {
		referred = make(chan found, 1)
		go func() {
			e, err := m.findExpansion(ctx, p.ref.Repository, md)
			referred <- found{e, err}
		}()
	}
	lazy, reason := p.offer()
	if lazy {
		return SourceMountAPI, "", nil
	}
	if referred == nil {
		p.why = fallbackNoLayerMounts
		return "", reason, nil
	}
	r := <-referred
	switch {
	case r.err != nil:
		p.why = fallbackReferrersFailed
		return "", reason + "; looking for an expansion referrer failed: " + r.err.Error(), nil
	case len(r.exps) == 0:
		p.why = fallbackNoReferrer
		return "", reason + " and the image has no expansion referrer (strata expand makes one)", nil
	}
	m.log.Debug("pull: expansion referrer", "ref", p.ref, "layers", len(r.exps), "after", time.Since(p.start))
	return SourceReferrers, "", r.exps
}

// bind waits for the layers' indexes, binds each to the diff ID img's
// config gives it and saves it, and returns the layers to pull the
// ordinary way: all of them when no expansion is offered, else those that
// have none or whose expansion is not the layer's (lazy is then false,
// and reason says why).
func (p *pull) bind(img *remote.Image) (fallback []int, lazy bool, reason string, err error) {
	select {
	case <-p.decided:
	case <-p.ctx.Done():
		return nil, false, "", p.ctx.Err()
	}
	lazy, reason = p.source != "", p.reason
	layers := img.Manifest.Layers
	unpackAll := !lazy
	errs := make([]error, len(layers))
	if lazy {
		for i, e := range p.early {
			select {
			case <-e.done:
			case <-p.ctx.Done():
				return nil, false, "", p.ctx.Err()
			}
			if errs[i] = e.err; e.err == nil && e.raw != nil {
				errs[i] = p.m.saveIndex(layers[i], img.Config.RootFS.DiffIDs[i], e.md, e.raw, e.ix)
			}
		}
	}
	for i, err := range errs {
		switch {
		case unpackAll:
			fallback = append(fallback, i)
		case err == nil:
		case errors.Is(err, remote.ErrExpansionFailed) || errors.Is(err, remote.ErrNotFound) || errors.Is(err, remote.ErrExpanding) || errors.Is(err, errNotBound):
			// This layer is pulled the ordinary way; the others stay
			// layer mounts.
			if errors.Is(err, errNotBound) {
				p.m.log.Warn("pull: refusing an expansion that is not the layer's; pulling the layer whole", "ref", p.ref, "layer", layers[i].Digest, "err", err)
			}
			if lazy {
				lazy, reason = false, fmt.Sprintf("layer %s has no layer mount: %v", layers[i].Digest, err)
				p.why = layerFallback(err)
			}
			fallback = append(fallback, i)
		default:
			return nil, false, "", err
		}
	}
	return fallback, lazy, reason, nil
}

// pullConcurrency bounds the layers whose mount and index requests are in
// flight at once; downloadConcurrency the fallback downloads (containerd's
// default is 3).
const (
	pullConcurrency     = 32
	downloadConcurrency = 3
)

// forEach calls fn(0) … fn(n-1), at most limit at a time, and waits for
// them. Calls not yet started when ctx is done are skipped.
func forEach(ctx context.Context, n, limit int, fn func(i int)) {
	sem := make(chan struct{}, limit)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			fn(i)
		}()
	}
	wg.Wait()
}

// knownOffer returns whether the registry offers layer mounts, if the node
// has asked it already.
func (m *Manager) knownOffer(registry string) (offers, known bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	offers, known = m.info[registry]
	return offers, known
}

// offersMounts asks a registry, once, whether it serves layer mounts.
func (m *Manager) offersMounts(ctx context.Context, registry string) (bool, string) {
	m.mu.Lock()
	v, ok := m.info[registry]
	m.mu.Unlock()
	if ok {
		if !v {
			return false, "the registry does not offer layer mounts"
		}
		return true, ""
	}
	info, ok, err := m.client.Info(ctx, registry)
	if err != nil {
		return false, "asking the registry for layer mounts failed: " + err.Error()
	}
	if ok {
		ok = false
		for _, v := range info.Versions {
			if v == layerindex.Version {
				ok = true
			}
		}
	}
	m.mu.Lock()
	m.info[registry] = ok
	m.mu.Unlock()
	if !ok {
		return false, "the registry does not offer layer mounts"
	}
	return true, ""
}

// preconnect is the number of connections a pull opens ahead: the
// config, the start-up profile, and a few layer mounts and indexes.
const preconnect = 4

// unpackLayer downloads and unpacks a layer for the fallback path.
func (m *Manager) unpackLayer(ctx context.Context, repo remote.Repository, l ocispec.Descriptor, diffID digest.Digest) error {
	dir := layerDir(m.root, l.Digest)
	fs := filepath.Join(dir, "fs")
	if _, err := os.Stat(filepath.Join(dir, "unpacked")); err == nil {
		return nil
	}
	os.RemoveAll(fs)
	if err := os.MkdirAll(fs, 0o755); err != nil {
		return err
	}
	rc, err := m.client.FetchBlob(ctx, repo, l)
	if err != nil {
		return fmt.Errorf("download layer %s: %w", l.Digest, err)
	}
	defer rc.Close()
	m.setProgress(l.Digest, 0, l.Size)
	defer m.endProgress(l.Digest)
	progress := func(n int64) { m.setProgress(l.Digest, n, l.Size) }
	st, err := unpack.Layer(ctx, rc, fs, unpack.Options{Logger: m.log, Progress: progress})
	if err != nil {
		os.RemoveAll(fs)
		return fmt.Errorf("unpack layer %s: %w", l.Digest, err)
	}
	m.metrics.layerBytes.Add(l.Size)
	if st.DiffID != diffID {
		os.RemoveAll(fs)
		return fmt.Errorf("layer %s: unpacked content is %s, the image config says %s", l.Digest, st.DiffID, diffID)
	}
	if err := atomicfile.Write(filepath.Join(dir, "unpacked-size"), []byte(strconv.FormatInt(st.Bytes, 10))); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, "unpacked"), []byte(st.DiffID.String())); err != nil {
		return err
	}
	m.reserveUnpacked() // unpacked layers count against the node's budget
	return nil
}
