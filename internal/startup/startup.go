// Package startup is the node's side of start-up profiles (api.Profile):
// what an image's containers read while they start, recorded by the first
// start of the image and stored in its registry, then fetched by every
// later start ahead of its reads.
//
// A Profiles is one node's: Fetch asks the registry for an image's profile
// and Begin fetches what it lists, before the layers' indexes are there:
// the image's start-up pack (api.Pack: exactly the bytes the recording
// read, in first-read order) or else the profile's frames. Source is the
// layerfs.Source of a layer's data blob that serves reads from those
// early bytes first and the registry after. Record and Finish record the
// reads of a start whose image has no profile and store them as one.
//
// It never imports package node: what it needs of the node's mounted
// layers comes in through Options.
package startup

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// Options configure Profiles.
type Options struct {
	// Client reads profiles, packs and frames from registries and stores
	// profiles.
	Client *remote.Client
	// Cache keeps verified pack chunks (nil: none).
	Cache  *cache.Cache
	Logger *slog.Logger
	// FetchTimeout is the node's bound on a read that waits for the
	// registry (0: the default).
	FetchTimeout time.Duration
	// Window is how long after a start its reads are recorded (default
	// 10 s; Finish ends a recording sooner).
	Window time.Duration
	// EarlyMax bounds the memory of early fetches and start-up packs held
	// at once, over all starts (0: DefaultEarlyMax). A profile whose
	// frames or pack would go past it is not fetched early: its layers
	// read on demand.
	EarlyMax int64
	// Prefetch, if set, prefetches frames of a mounted layer (by layer
	// digest and data blob, mounted from repo): the profile's frames of
	// the layers whose pack failed.
	Prefetch func(repo remote.Repository, layer, data digest.Digest, frames []int)
	// Stored, if set, is called when a recorded profile was stored in the
	// registry for the image of target.
	Stored func(t Target, p *api.Profile)
	// PushReferrer, if set, stores profile p of the image of t, whose
	// registry has no profile route (t.Referrers), as a profile artifact
	// referring to its manifest; nil: such profiles are not stored.
	PushReferrer func(ctx context.Context, t Target, p *api.Profile) error
}

// Profiles holds one node's start-up profiles at work: the early fetches
// and packs in use, and the recordings under way.
type Profiles struct {
	opts   Options
	client *remote.Client
	cache  *cache.Cache
	log    *slog.Logger

	mu sync.Mutex
	// early: data blob parts fetched from profiles before the indexes.
	early map[digest.Digest]*earlyBlob
	// recordings of start-up profiles, by lease ID
	recordings map[string]*recording
	uploads    sync.WaitGroup

	// packs: the start-up packs in use, by the repository and data blob
	// of the layer whose pages they hold; packing: the packs fetched, by
	// repository and digest. Guarded by packsMu, not mu: every read of a
	// lazy layer looks.
	packsMu sync.RWMutex
	packs   map[packKey]*packLayer
	packing map[packKey]bool

	// packBytes counts the bytes of start-up packs fetched (PackBytes).
	packBytes atomic.Int64
	// held is the memory early fetches and packs hold or will (EarlyMax).
	held atomic.Int64
}

// DefaultEarlyMax is the default of Options.EarlyMax.
const DefaultEarlyMax = 256 << 20

// reserve takes n bytes of the early-fetch memory budget, if they fit.
func (s *Profiles) reserve(n int64) bool {
	for {
		h := s.held.Load()
		if h+n > s.opts.EarlyMax {
			return false
		}
		if s.held.CompareAndSwap(h, h+n) {
			return true
		}
	}
}

// EarlyHeld returns the bytes of early fetches and packs held now.
func (s *Profiles) EarlyHeld() int64 { return s.held.Load() }

// PackBytes returns the bytes of start-up packs fetched from registries
// since New (chunks the cache held are not fetched). The frames of early
// fetches are not counted here: a layer's file system reads them through
// Source and counts them as its own.
func (s *Profiles) PackBytes() int64 { return s.packBytes.Load() }

// New returns the start-up profiles of a node.
func New(opts Options) *Profiles {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Window <= 0 {
		opts.Window = 10 * time.Second
	}
	if opts.EarlyMax <= 0 {
		opts.EarlyMax = DefaultEarlyMax
	}
	if opts.Client == nil {
		opts.Client = remote.New(remote.Options{Logger: opts.Logger})
	}
	return &Profiles{
		opts: opts, client: opts.Client, cache: opts.Cache, log: opts.Logger,
		early: map[digest.Digest]*earlyBlob{}, recordings: map[string]*recording{},
		packs: map[packKey]*packLayer{}, packing: map[packKey]bool{},
	}
}

// Fetch asks repo for the start-up profile of image manifest md, whose
// layers are layers, and begins fetching what it lists (Begin; beyond a
// head, once indexes is closed). With referrers, the profile is looked for
// as a profile artifact referring to md (a registry without strata's
// routes). missing reports that the registry has none of its own (none
// at all, or one derived from another image's, api.Profile.Derived), so
// the image's first start records one.
func (s *Profiles) Fetch(ctx context.Context, repo remote.Repository, md digest.Digest, layers []ocispec.Descriptor, indexes <-chan struct{}, referrers bool) (p *api.Profile, missing bool) {
	var err error
	if referrers {
		p, err = s.client.ProfileReferrer(ctx, repo, md)
	} else {
		p, err = s.client.Profile(ctx, repo, md)
	}
	switch {
	case err == nil && p.Version == layerindex.Version:
		s.Begin(repo, p, layers, indexes)
		// A profile derived from another image's: the start records the
		// image's own.
		return p, p.Derived
	case errors.Is(err, remote.ErrNotFound):
		return nil, true
	case err != nil:
		s.log.Debug("no start-up profile", "repo", repo.Name, "manifest", md, "err", err)
	}
	return nil, false
}

// Begin starts fetching what profile p lists for the layers of an image
// in repo: its start-up pack when it has a valid one, else its frames.
// Beyond a head, the requests wait for indexes to be closed (the image's
// indexes are in; nil when they are).
func (s *Profiles) Begin(repo remote.Repository, p *api.Profile, layers []ocispec.Descriptor, indexes <-chan struct{}) {
	if !s.StartPack(repo, p, layers, indexes) {
		s.fetchEarly(repo, p, layers, indexes)
	}
}

// Frames returns the frames of profile p to prefetch for the layer whose
// digest and data blob are layer and data, mounted from repo: none when a
// start-up pack in use holds its pages.
func (s *Profiles) Frames(p *api.Profile, repo remote.Repository, layer, data digest.Digest) []int {
	if s.packFor(repo, data) != nil {
		return nil
	}
	return ProfileFrames(p, layer, data)
}

// ProfileFrames returns the frames profile p lists for the layer whose
// digest and data blob are layer and data (nil p: none).
func ProfileFrames(p *api.Profile, layer, data digest.Digest) []int {
	if p == nil {
		return nil
	}
	for _, pl := range p.Layers {
		if pl.Layer == layer && pl.Data == data {
			return pl.Frames
		}
	}
	return nil
}

// attemptTimeout is the per-request deadline within a fetch bound.
func attemptTimeout(fetch time.Duration) time.Duration {
	if fetch <= 0 {
		return 0
	}
	return max(fetch/3, time.Second)
}
