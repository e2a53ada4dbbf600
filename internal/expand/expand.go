// Package expand is the registry's expansion service: it turns each pushed
// layer into an expanded layer (a layerindex index and data blob), once per
// layer digest, and answers layer-mount requests.
//
// Work arrives two ways: a pushed image manifest (or index) queues its
// layers, and a mount request for a layer not yet expanded queues that
// layer. Each layer digest is expanded at most once at a time by a bounded
// pool of workers. The result is stored as two ordinary blobs and a small
// record; when every layer of a manifest is done, the set is published as an
// OCI artifact whose subject is the manifest (the Referrers API finds it).
//
// State under <store root>/expand/:
//
//	queue/<alg>-<hex>     a pending layer: JSON {layer, repos, manifests}; removed when done
//	done/<alg>-<hex>      a finished expansion: the api.MountDescriptor as JSON
//	failed/<alg>-<hex>    a layer that cannot be expanded: the reason, as text
//	index-zst/<alg>-<hex> an index blob (by its digest) compressed with zstd, as served
//	started/<alg>-<hex>   how many times the expansion of a layer began and did not end
//
// All are written atomically. A restart re-queues everything in
// queue/, so unfinished work is redone; a layer whose expansion began
// maxAttempts times without ending (the process died each time, for
// instance killed for memory) is recorded as failed instead, so that no
// layer can make the registry crash at every start. Expansion never makes a push fail:
// errors are logged and recorded, never returned to the pusher.
package expand

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

// Sentinel errors of Mount.
var (
	// ErrPending: the layer is being expanded; ask again later.
	ErrPending = errors.New("expansion in progress")
	// ErrUnexpandable: the layer cannot be expanded (the error wraps the reason).
	ErrUnexpandable = errors.New("layer cannot be expanded")
)

// Options configure the service.
type Options struct {
	// Logger; nil discards.
	Logger *slog.Logger
	// Workers bounds concurrent expansions (default 2).
	Workers int
	// Build is passed to layerindex.Build (budgets against hostile layers).
	Build layerindex.Options
	// OnDone, if set, is called after each expansion attempt with its
	// outcome ("ok", "invalid", "error").
	OnDone func(outcome string)
	// Fetching, if set, reports whether a layer a repository lacks is on
	// its way (a mirror fetching it from its upstream): a layer-mount
	// request for it is answered 202, not 404.
	Fetching func(repo string, layer digest.Digest) bool
}

// Service expands layers of one store.
type Service struct {
	st   *store.Store
	opts Options
	log  *slog.Logger
	dir  string

	mu       sync.Mutex
	inflight map[digest.Digest]bool
	queue    chan digest.Digest
	wg       sync.WaitGroup
	// finished is closed and replaced whenever an expansion attempt ends,
	// waking mount requests that wait for one.
	finished chan struct{}
	// packing holds a token while a start-up pack is made: one at a time.
	packing chan struct{}
	// profileMu orders profile writes (see PutProfile).
	profileMu sync.Mutex
}

// job is a queued layer and who is waiting for it.
type job struct {
	Layer digest.Digest `json:"layer"`
	// Repos hold the layer; the first one is read from.
	Repos []string `json:"repos"`
	// Manifests (repo@digest) that publish an artifact when all their
	// layers are done.
	Manifests []string `json:"manifests,omitempty"`
}

// New returns a service over st. Call Run to start its workers.
func New(st *store.Store, opts Options) (*Service, error) {
	if opts.Workers <= 0 {
		opts.Workers = 2
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir := filepath.Join(st.Root(), "expand")
	for _, d := range []string{"queue", "done", "failed", "index-zst", "started"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("expand: %w", err)
		}
	}
	return &Service{
		st: st, opts: opts, log: log, dir: dir,
		inflight: map[digest.Digest]bool{},
		queue:    make(chan digest.Digest, 1<<16),
		finished: make(chan struct{}),
		packing:  make(chan struct{}, 1),
	}, nil
}

// Run starts the workers, re-queues work left by a previous process, and
// returns when ctx is done and the workers have stopped.
func (s *Service) Run(ctx context.Context) {
	for i := 0; i < s.opts.Workers; i++ {
		s.wg.Add(1)
		go s.worker(ctx)
	}
	ents, _ := os.ReadDir(filepath.Join(s.dir, "queue"))
	for _, e := range ents {
		if d, ok := nameDigest(e.Name()); ok {
			s.schedule(d)
		}
	}
	<-ctx.Done()
	s.wg.Wait()
}

func recordName(d digest.Digest) string { return string(d.Algorithm()) + "-" + d.Encoded() }

func nameDigest(name string) (digest.Digest, bool) {
	alg, hex, ok := strings.Cut(name, "-")
	d := digest.Digest(alg + ":" + hex)
	return d, ok && d.Validate() == nil
}

func (s *Service) path(kind string, d digest.Digest) string {
	return filepath.Join(s.dir, kind, recordName(d))
}

// schedule hands layer d to the workers unless it is already in flight.
func (s *Service) schedule(d digest.Digest) {
	s.mu.Lock()
	if s.inflight[d] {
		s.mu.Unlock()
		return
	}
	s.inflight[d] = true
	s.mu.Unlock()
	select {
	case s.queue <- d:
	default:
		// The channel is full: the record in queue/ keeps the work; a
		// restart or the next request for the layer picks it up.
		s.mu.Lock()
		delete(s.inflight, d)
		s.mu.Unlock()
		s.log.Warn("expansion queue full, deferring", "layer", d)
	}
}

// enqueue records that repo holds layer d (and, if manifest is set, that
// the manifest waits for it) and schedules the expansion.
func (s *Service) enqueue(repo string, d digest.Digest, manifest string) error {
	s.mu.Lock()
	qp := s.path("queue", d)
	var j job
	if b, err := os.ReadFile(qp); err == nil {
		json.Unmarshal(b, &j)
	}
	j.Layer = d
	if !slices.Contains(j.Repos, repo) {
		j.Repos = append(j.Repos, repo)
	}
	if manifest != "" && !slices.Contains(j.Manifests, manifest) {
		j.Manifests = append(j.Manifests, manifest)
	}
	b, _ := json.Marshal(j)
	err := atomicfile.Write(qp, b)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	s.schedule(d)
	return nil
}

type manifestDoc struct {
	MediaType    string               `json:"mediaType"`
	ArtifactType string               `json:"artifactType"`
	Config       *ocispec.Descriptor  `json:"config"`
	Layers       []ocispec.Descriptor `json:"layers"`
	Manifests    []ocispec.Descriptor `json:"manifests"`
}

// imageLayers returns the expandable layers of an image manifest.
func imageLayers(content []byte) ([]digest.Digest, error) {
	var doc manifestDoc
	if err := json.Unmarshal(content, &doc); err != nil {
		return nil, err
	}
	if doc.ArtifactType != "" || (doc.Config != nil && !api.IsImageConfig(doc.Config.MediaType)) {
		return nil, nil // not a container image (an artifact, our own expansion among them)
	}
	var out []digest.Digest
	for _, l := range doc.Layers {
		if api.Expandable(l.MediaType) {
			out = append(out, l.Digest)
		}
	}
	return out, nil
}

// OnManifest queues the layers of a pushed manifest. It is the registry's
// OnManifest hook: it logs errors and never fails the push.
func (s *Service) OnManifest(ctx context.Context, repo string, m store.Manifest) {
	layers, err := imageLayers(m.Content)
	if err != nil {
		s.log.Warn("expand: unreadable manifest", "repo", repo, "digest", m.Digest, "err", err)
		return
	}
	ref := repo + "@" + m.Digest.String()
	queued := false
	for _, l := range layers {
		if _, err := s.st.StatBlob(ctx, repo, l); err != nil {
			continue // sparse manifest: the layer is not here
		}
		if s.done(l) != nil || s.failed(l) != "" {
			continue
		}
		if err := s.enqueue(repo, l, ref); err != nil {
			s.log.Warn("expand: cannot queue layer", "repo", repo, "layer", l, "err", err)
		}
		queued = true
	}
	if !queued {
		s.maybePublish(ctx, ref)
	}
	// An index needs nothing: its children were pushed before it, and each
	// queued its own layers.
}

func (s *Service) done(d digest.Digest) *api.MountDescriptor {
	b, err := os.ReadFile(s.path("done", d))
	if err != nil {
		return nil
	}
	var md api.MountDescriptor
	if json.Unmarshal(b, &md) != nil {
		return nil
	}
	return &md
}

func (s *Service) failed(d digest.Digest) string {
	b, err := os.ReadFile(s.path("failed", d))
	if err != nil {
		return ""
	}
	return string(b)
}

// Mount answers a layer-mount request for layer d of repo: the descriptor
// when the expansion exists (its blobs linked into repo), ErrPending while it
// runs (and queues it if nobody had), store.ErrBlobUnknown when the layer is
// not in repo, or an error wrapping ErrUnexpandable with the reason.
func (s *Service) Mount(ctx context.Context, repo string, d digest.Digest) (*api.MountDescriptor, error) {
	if _, err := s.st.StatBlob(ctx, repo, d); err != nil {
		return nil, err
	}
	if md := s.done(d); md != nil {
		if err := s.st.Link(ctx, repo, md.Index.Digest); err != nil {
			return nil, fmt.Errorf("expand %s: link index: %w", d, err)
		}
		if err := s.st.Link(ctx, repo, md.Data.Digest); err != nil {
			return nil, fmt.Errorf("expand %s: link data: %w", d, err)
		}
		return md, nil
	}
	if reason := s.failed(d); reason != "" {
		return nil, fmt.Errorf("%w: %s", ErrUnexpandable, reason)
	}
	if err := s.enqueue(repo, d, ""); err != nil {
		return nil, err
	}
	return nil, ErrPending
}

// MountWait is Mount that, while the layer is being expanded, waits up to
// wait for the expansion to finish before answering ErrPending, so a client
// usually gets its answer in one round trip.
func (s *Service) MountWait(ctx context.Context, repo string, d digest.Digest, wait time.Duration) (*api.MountDescriptor, error) {
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		finished := s.finished
		s.mu.Unlock()
		md, err := s.Mount(ctx, repo, d)
		if !errors.Is(err, ErrPending) {
			return md, err
		}
		select {
		case <-finished:
		case <-deadline.C:
			return nil, ErrPending
		case <-ctx.Done():
			return nil, ErrPending
		}
	}
}

func (s *Service) worker(ctx context.Context) {
	defer s.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case d := <-s.queue:
			s.process(ctx, d)
			s.mu.Lock()
			delete(s.inflight, d)
			close(s.finished)
			s.finished = make(chan struct{})
			s.mu.Unlock()
		}
	}
}

func (s *Service) process(ctx context.Context, d digest.Digest) {
	s.mu.Lock()
	b, err := os.ReadFile(s.path("queue", d))
	s.mu.Unlock()
	if err != nil {
		return // done meanwhile
	}
	var j job
	if err := json.Unmarshal(b, &j); err != nil || len(j.Repos) == 0 {
		s.log.Warn("expand: dropping corrupt queue record", "layer", d, "err", err)
		os.Remove(s.path("queue", d))
		return
	}
	outcome := "ok"
	if s.done(d) == nil && s.failed(d) == "" {
		started := s.path("started", d)
		n, _ := strconv.Atoi(strings.TrimSpace(readString(started)))
		if n >= maxAttempts {
			reason := fmt.Sprintf("expand %s: %v: the expansion began %d times and never ended (the registry stopped during each)", d, layerindex.ErrInvalidLayer, n)
			s.log.Error("layer cannot be expanded", "layer", d, "reason", reason)
			atomicfile.Write(s.path("failed", d), []byte(reason))
			os.Remove(started)
			os.Remove(s.path("queue", d))
			if s.opts.OnDone != nil {
				s.opts.OnDone("invalid")
			}
			return
		}
		if err := atomicfile.Write(started, []byte(strconv.Itoa(n+1))); err != nil {
			s.log.Warn("expand: cannot record the attempt", "layer", d, "err", err)
		}
		md, err := s.expand(ctx, j.Repos[0], d)
		if ctx.Err() != nil && err != nil {
			// Shutting down: this attempt does not count.
			if n == 0 {
				os.Remove(started)
			} else {
				atomicfile.Write(started, []byte(strconv.Itoa(n)))
			}
			return // the queue record stays for the next start
		}
		os.Remove(started)
		switch {
		case err == nil:
			b, _ := json.Marshal(md)
			err = atomicfile.Write(s.path("done", d), b)
			if err != nil {
				outcome = "error"
				s.log.Error("expand: recording result", "layer", d, "err", err)
			}
		case errors.Is(err, layerindex.ErrInvalidLayer):
			outcome = "invalid"
			s.log.Warn("layer cannot be expanded", "layer", d, "reason", err)
			atomicfile.Write(s.path("failed", d), []byte(err.Error()))
		default:
			outcome = "error"
			s.log.Error("expand: failed, will retry on the next request", "layer", d, "err", err)
			os.Remove(s.path("queue", d))
			if s.opts.OnDone != nil {
				s.opts.OnDone(outcome)
			}
			return
		}
		if s.opts.OnDone != nil {
			s.opts.OnDone(outcome)
		}
	}
	// Re-read: requests may have added waiters while we worked.
	s.mu.Lock()
	if b, err := os.ReadFile(s.path("queue", d)); err == nil {
		json.Unmarshal(b, &j)
	}
	os.Remove(s.path("queue", d))
	s.mu.Unlock()
	for _, ref := range j.Manifests {
		s.maybePublish(ctx, ref)
	}
}

// maxAttempts bounds how often the expansion of one layer may begin
// without ending before the layer is recorded as failed.
const maxAttempts = 3

func readString(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// expand builds the expansion of layer d (read from repo) and stores its
// blobs.
func (s *Service) expand(ctx context.Context, repo string, d digest.Digest) (*api.MountDescriptor, error) {
	log := s.log.With("layer", d)
	log.Info("expanding layer")
	src, err := s.st.OpenBlob(ctx, repo, d)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	data, err := s.st.CreateTemp("expand-data-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(data.Name())
	dataDigester := digest.Canonical.Digester()
	counter := &countWriter{}
	ix, err := layerindex.Build(ctx, src, io.MultiWriter(data, dataDigester.Hash(), counter), s.opts.Build)
	if cerr := data.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("expand %s: %w", d, err)
	}
	if ix.Layer != d {
		return nil, fmt.Errorf("expand %s: %w: blob content hashes to %s", d, layerindex.ErrInvalidLayer, ix.Layer)
	}
	idx, err := s.st.CreateTemp("expand-index-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(idx.Name())
	idxDigester := digest.Canonical.Digester()
	idxCounter := &countWriter{}
	err = ix.Encode(io.MultiWriter(idx, idxDigester.Hash(), idxCounter))
	if cerr := idx.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("expand %s: encode index: %w", d, err)
	}
	md := &api.MountDescriptor{
		Layer:   d,
		DiffID:  ix.DiffID,
		Version: layerindex.Version,
		Index:   ocispec.Descriptor{MediaType: layerindex.MediaTypeIndex, Digest: idxDigester.Digest(), Size: idxCounter.n},
		Data:    ocispec.Descriptor{MediaType: layerindex.MediaTypeData, Digest: dataDigester.Digest(), Size: counter.n},
	}
	if err := s.st.CommitFile(ctx, repo, data.Name(), md.Data.Digest); err != nil {
		return nil, fmt.Errorf("expand %s: store data: %w", d, err)
	}
	if err := s.st.CommitFile(ctx, repo, idx.Name(), md.Index.Digest); err != nil {
		return nil, fmt.Errorf("expand %s: store index: %w", d, err)
	}
	if _, err := s.compressedIndex(ctx, repo, md.Index.Digest); err != nil {
		log.Warn("compressed index not stored", "err", err)
	}
	log.Info("layer expanded", "entries", len(ix.Entries), "index", md.Index.Size, "data", md.Data.Size)
	return md, nil
}

// compressedIndex returns index blob d of repo compressed with zstd,
// making and keeping the compressed copy the first time. About two thirds
// of an index is paths and metadata that compress well; the file and frame
// digests do not (python's 0.52 MB index is 0.37 MB).
func (s *Service) compressedIndex(ctx context.Context, repo string, d digest.Digest) ([]byte, error) {
	path := s.path("index-zst", d)
	if b, err := os.ReadFile(path); err == nil {
		return b, nil
	}
	f, err := s.st.OpenBlob(ctx, repo, d)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	raw, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	defer enc.Close()
	b := enc.EncodeAll(raw, nil)
	if err := atomicfile.Write(path, b); err != nil {
		return nil, err
	}
	return b, nil
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// maybePublish publishes the expansion artifact of manifest ref
// (repo@digest) once every expandable layer of it is done.
func (s *Service) maybePublish(ctx context.Context, ref string) {
	repo, ds, _ := strings.Cut(ref, "@")
	md, err := digest.Parse(ds)
	if err != nil {
		return
	}
	m, err := s.st.GetManifest(ctx, repo, md)
	if err != nil {
		return // deleted meanwhile
	}
	layers, err := imageLayers(m.Content)
	if err != nil || len(layers) == 0 {
		return
	}
	var exps []api.LayerExpansion
	for _, l := range layers {
		if _, err := s.st.StatBlob(ctx, repo, l); err != nil {
			continue
		}
		done := s.done(l)
		if done == nil {
			if s.failed(l) != "" {
				continue
			}
			return // still pending
		}
		if err := s.st.Link(ctx, repo, done.Index.Digest); err != nil {
			return
		}
		if err := s.st.Link(ctx, repo, done.Data.Digest); err != nil {
			return
		}
		exps = append(exps, api.LayerExpansion{Layer: l, Index: done.Index, Data: done.Data})
	}
	if len(exps) == 0 {
		return
	}
	empty := []byte("{}")
	emptyDesc := ocispec.DescriptorEmptyJSON
	if err := s.st.PutBlob(ctx, repo, emptyDesc.Digest, int64(len(empty)), strings.NewReader(string(empty))); err != nil {
		s.log.Warn("expand: storing empty config", "err", err)
		return
	}
	b, err := api.ExpansionArtifact(ocispec.Descriptor{MediaType: m.MediaType, Digest: m.Digest, Size: int64(len(m.Content))}, exps)
	if err != nil {
		s.log.Warn("expand: making artifact", "manifest", ref, "err", err)
		return
	}
	ad := digest.Canonical.FromBytes(b)
	err = s.st.PutManifest(ctx, repo,
		store.Manifest{Digest: ad, MediaType: ocispec.MediaTypeImageManifest, Content: b, Subject: m.Digest},
		store.ManifestMeta{Subject: m.Digest, ArtifactType: api.ArtifactTypeExpansion}, nil)
	if err != nil {
		s.log.Warn("expand: publishing artifact", "manifest", ref, "err", err)
		return
	}
	s.log.Info("expansion published as referrer", "manifest", ref, "artifact", ad)
}
