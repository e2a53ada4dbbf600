// Package mirror makes strata's registry a read-only pull-through mirror of
// an upstream registry (Docker Hub, GHCR, ECR, another distribution
// registry), as the CNCF distribution registry's proxy mode does: a
// manifest or blob asked for the first time is fetched from the upstream,
// verified, stored, and served; the layers of a manifest are fetched in
// the background at once and then expanded, so that nodes get layer
// mounts; tags are checked again against the upstream once their TTL has
// passed, and served from the store while the upstream is down.
//
// The registry asks it (registry.Options.Upstream) before it answers a
// manifest or blob read from its store, and the expansion service asks it
// whether a layer that is not there yet is on its way (202 instead of 404).
package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// Options configure a Mirror.
type Options struct {
	// Store is the mirror's own store.
	Store *store.Store
	// Client reaches the upstream (its Hosts, credentials, retries).
	Client *remote.Client
	// Registry is the upstream's host[:port] as the client knows it.
	Registry string
	// TTL is how long a tag fetched from the upstream is served before it
	// is checked again (default 10 minutes).
	TTL time.Duration
	// OnManifest is called for an image manifest once it and its layers
	// are stored (the expansion service's OnManifest).
	OnManifest func(ctx context.Context, repo string, m store.Manifest)
	Logger     *slog.Logger
}

// A Mirror fetches what its store lacks from the upstream.
type Mirror struct {
	opts Options
	st   *store.Store
	log  *slog.Logger
	// ctx bounds the background fetches (Close ends them).
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	group singleflight.Group
	mu    sync.Mutex
	// checked: when each repo:tag was last checked against the upstream.
	checked map[string]time.Time
	// fetching: the blobs being fetched, by repo@digest.
	fetching map[string]bool
}

// failedCheckTTL is how long a tag whose check failed (the upstream is
// down) is served from the store before the upstream is asked again.
const failedCheckTTL = 30 * time.Second

// layerConcurrency bounds the blobs of one manifest fetched at once.
const layerConcurrency = 4

// New returns a mirror.
func New(opts Options) *Mirror {
	if opts.TTL <= 0 {
		opts.TTL = 10 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Mirror{opts: opts, st: opts.Store, log: opts.Logger, ctx: ctx, cancel: cancel,
		checked: map[string]time.Time{}, fetching: map[string]bool{}}
}

// Close stops the background fetches and waits for them.
func (m *Mirror) Close() {
	m.cancel()
	m.wg.Wait()
}

func (m *Mirror) repo(name string) remote.Repository {
	return remote.Repository{Registry: m.opts.Registry, Name: name}
}

// Manifest makes sure the store can answer manifest ref (a tag or a
// digest) of repo: a digest it lacks, or a tag it lacks or last checked
// longer than the TTL ago, is fetched from the upstream. While the
// upstream is down a stored tag is served as it is. An error is for a
// manifest the store cannot answer (store.ErrManifestUnknown when the
// upstream has none).
func (m *Mirror) Manifest(ctx context.Context, repo, ref string) error {
	if d, err := digest.Parse(ref); err == nil {
		if _, err := m.st.GetManifest(ctx, repo, d); err == nil {
			return nil
		}
		_, err, _ = m.group.Do("manifest "+repo+"@"+ref, func() (any, error) { return nil, m.fetchManifest(ctx, repo, ref) })
		return err
	}
	key := repo + ":" + ref
	m.mu.Lock()
	last, ok := m.checked[key]
	m.mu.Unlock()
	_, local := m.st.Resolve(ctx, repo, ref)
	if local == nil && ok && time.Since(last) < m.opts.TTL {
		return nil
	}
	_, err, _ := m.group.Do("manifest "+key, func() (any, error) { return nil, m.fetchManifest(ctx, repo, ref) })
	switch {
	case err == nil:
		m.mark(key, time.Now())
		return nil
	case local == nil && !errors.Is(err, store.ErrManifestUnknown):
		// The upstream is down or refuses: serve what the store has, and
		// ask again a little later.
		m.log.Warn("mirror: upstream unavailable, serving the stored tag", "repo", repo, "tag", ref, "err", err)
		m.mark(key, time.Now().Add(failedCheckTTL-m.opts.TTL))
		return nil
	}
	return err
}

func (m *Mirror) mark(key string, at time.Time) {
	m.mu.Lock()
	m.checked[key] = at
	m.mu.Unlock()
}

// fetchManifest fetches manifest ref of repo from the upstream, stores it
// (pointing tag ref at it), and starts fetching its layers.
func (m *Mirror) fetchManifest(ctx context.Context, repo, ref string) error {
	raw, mt, d, err := m.opts.Client.FetchManifest(ctx, m.repo(repo), ref)
	if errors.Is(err, remote.ErrNotFound) {
		return fmt.Errorf("%w: %s:%s upstream: %v", store.ErrManifestUnknown, repo, ref, err)
	}
	if err != nil {
		return fmt.Errorf("upstream manifest %s:%s: %w", repo, ref, err)
	}
	var tags []string
	if _, err := digest.Parse(ref); err != nil {
		tags = []string{ref}
		if old, err := m.st.Resolve(ctx, repo, ref); err == nil && old == d {
			return nil // unchanged
		}
	}
	var doc struct {
		Subject      *ocispec.Descriptor  `json:"subject"`
		ArtifactType string               `json:"artifactType"`
		Config       *ocispec.Descriptor  `json:"config"`
		Layers       []ocispec.Descriptor `json:"layers"`
		Annotations  map[string]string    `json:"annotations"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return fmt.Errorf("upstream manifest %s:%s: %w", repo, ref, err)
	}
	meta := store.ManifestMeta{ArtifactType: doc.ArtifactType, Annotations: doc.Annotations}
	if doc.Subject != nil {
		meta.Subject = doc.Subject.Digest
	}
	if meta.ArtifactType == "" && doc.Config != nil {
		meta.ArtifactType = doc.Config.MediaType
	}
	man := store.Manifest{Digest: d, MediaType: mt, Content: raw, Subject: meta.Subject}
	if err := m.st.PutManifest(ctx, repo, man, meta, tags); err != nil {
		return fmt.Errorf("store manifest %s@%s: %w", repo, d, err)
	}
	m.log.Info("mirror: manifest fetched", "repo", repo, "ref", ref, "digest", d)
	if doc.Config != nil {
		// An image (or an artifact): its blobs, then its expansion.
		blobs := append([]ocispec.Descriptor{*doc.Config}, doc.Layers...)
		m.markFetching(repo, blobs, true)
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.fetchBlobs(repo, man, blobs)
		}()
	}
	return nil
}

func (m *Mirror) markFetching(repo string, blobs []ocispec.Descriptor, on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range blobs {
		if on {
			m.fetching[repo+"@"+b.Digest.String()] = true
		} else {
			delete(m.fetching, repo+"@"+b.Digest.String())
		}
	}
}

// fetchBlobs fetches the blobs of manifest man into the store, a few at a
// time, then hands the manifest to OnManifest.
func (m *Mirror) fetchBlobs(repo string, man store.Manifest, blobs []ocispec.Descriptor) {
	sem := make(chan struct{}, layerConcurrency)
	var wg sync.WaitGroup
	for _, b := range blobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			defer m.markFetching(repo, []ocispec.Descriptor{b}, false)
			if err := m.blob(m.ctx, repo, b); err != nil {
				m.log.Warn("mirror: blob not fetched", "repo", repo, "blob", b.Digest, "err", err)
			}
		}()
	}
	wg.Wait()
	if m.ctx.Err() == nil && m.opts.OnManifest != nil {
		m.opts.OnManifest(m.ctx, repo, man)
	}
}

// Fetching reports whether blob d of repo is being fetched from the
// upstream (a layer mount request for it is answered 202).
func (m *Mirror) Fetching(repo string, d digest.Digest) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.fetching[repo+"@"+d.String()]
}

// Blob makes sure the store holds blob d of repo, fetching it from the
// upstream the first time (once, however many ask at once).
func (m *Mirror) Blob(ctx context.Context, repo string, d digest.Digest) error {
	if _, err := m.st.StatBlob(ctx, repo, d); err == nil {
		return nil
	}
	return m.blob(ctx, repo, ocispec.Descriptor{Digest: d, Size: -1})
}

func (m *Mirror) blob(ctx context.Context, repo string, desc ocispec.Descriptor) error {
	if _, err := m.st.StatBlob(ctx, repo, desc.Digest); err == nil {
		return nil
	}
	// One fetch per blob; a request that gives up does not end it.
	ch := m.group.DoChan("blob "+repo+"@"+desc.Digest.String(), func() (any, error) {
		return nil, m.fetchBlob(m.ctx, repo, desc)
	})
	select {
	case r := <-ch:
		return r.Err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (m *Mirror) fetchBlob(ctx context.Context, repo string, desc ocispec.Descriptor) error {
	r := m.repo(repo)
	if desc.Size < 0 {
		n, err := m.opts.Client.BlobSize(ctx, r, desc.Digest)
		if errors.Is(err, remote.ErrNotFound) {
			return fmt.Errorf("%w: %s@%s upstream", store.ErrBlobUnknown, repo, desc.Digest)
		}
		if err != nil {
			return fmt.Errorf("upstream blob %s@%s: %w", repo, desc.Digest, err)
		}
		desc.Size = n
	}
	if m.st.HasBlob(desc.Digest) {
		// Stored for another repository; the upstream has it in this one
		// (asked above, or its manifest names it).
		return m.st.Link(ctx, repo, desc.Digest)
	}
	start := time.Now()
	rc, err := m.opts.Client.FetchBlob(ctx, r, desc)
	if errors.Is(err, remote.ErrNotFound) {
		return fmt.Errorf("%w: %s@%s upstream", store.ErrBlobUnknown, repo, desc.Digest)
	}
	if err != nil {
		return fmt.Errorf("upstream blob %s@%s: %w", repo, desc.Digest, err)
	}
	defer rc.Close()
	if err := m.st.PutBlob(ctx, repo, desc.Digest, desc.Size, rc); err != nil {
		return fmt.Errorf("mirror blob %s@%s: %w", repo, desc.Digest, err)
	}
	m.log.Info("mirror: blob fetched", "repo", repo, "blob", desc.Digest, "bytes", desc.Size, "took", time.Since(start).Round(time.Millisecond))
	return nil
}
