// Package gc collects the garbage of a registry's storage: what no image
// still uses, found by mark and sweep, while the registry serves.
//
// Mark: in each repository, the live manifests are every manifest that is
// not a referrer (or, with DeleteUntagged, those tags reach), what live
// indexes name, and the referrers of live manifests, transitively; the
// live blobs of a repository are those its live manifests name, the
// expansions (index and data blobs) of its live layers, and the packs of
// its live images' start-up profiles. Sweep: manifests, links, blobs,
// expansion records, compressed indexes and profiles outside the live sets
// are removed, and upload sessions and temporary files left behind.
//
// Safety beside a serving registry rests on times, not locks: nothing
// younger than the grace period (modified after the collection's start
// minus Grace) is removed, and every write that makes content needed again
// makes it young (package store: a blob pushed or mounted again, a HEAD of
// a blob, a manifest naming a blob; an expansion, a profile). A blob is
// moved out of sight before its time is checked the last time. A manifest
// naming a blob the collection removed anyway (a client that checked for
// it long before pushing the manifest) is refused with
// MANIFEST_BLOB_UNKNOWN, and the client pushes the blob again.
package gc

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/store"
)

// Options tune a collection.
type Options struct {
	// Grace: nothing modified less than Grace before the collection
	// started is removed (default DefaultGrace).
	Grace time.Duration
	// UploadMaxAge: upload sessions not written to for this long are
	// removed (default DefaultUploadMaxAge).
	UploadMaxAge time.Duration
	// DeleteUntagged also removes manifests that no tag reaches (through
	// indexes and subjects): images pushed by digest only.
	DeleteUntagged bool
	// DryRun reports what would be removed and removes nothing.
	DryRun bool
	Logger *slog.Logger
}

// Defaults of Options.
const (
	DefaultGrace        = time.Hour
	DefaultUploadMaxAge = 24 * time.Hour
)

// Report is what a collection removed (or, dry, would remove).
type Report struct {
	Repositories int // repositories looked at
	Manifests    int
	Links        int // blobs unlinked from a repository
	Blobs        int
	BlobBytes    int64
	Expansions   int // expansion records (done, failed, queued) of layers gone
	Indexes      int // compressed copies of index blobs
	IndexBytes   int64
	Profiles     int
	Uploads      int
	TempFiles    int
	TempBytes    int64
	EmptyRepos   int
	// Kept: blobs no image uses that are younger than the grace period.
	Kept    int
	DryRun  bool
	Elapsed time.Duration
}

type collector struct {
	st     *store.Store
	ex     *expand.Service
	opts   Options
	log    *slog.Logger
	cutoff time.Time
	rep    Report
}

// Collect runs one collection of st and the expansion state of ex.
func Collect(ctx context.Context, st *store.Store, ex *expand.Service, opts Options) (*Report, error) {
	if opts.Grace <= 0 {
		opts.Grace = DefaultGrace
	}
	if opts.UploadMaxAge <= 0 {
		opts.UploadMaxAge = DefaultUploadMaxAge
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	c := &collector{st: st, ex: ex, opts: opts, log: log, cutoff: start.Add(-opts.Grace)}
	c.rep.DryRun = opts.DryRun
	err := c.run(ctx)
	c.rep.Elapsed = time.Since(start)
	return &c.rep, err
}

// repoMark is what is live in one repository.
type repoMark struct {
	manifests map[digest.Digest]bool
	blobs     map[digest.Digest]bool
}

func (c *collector) run(ctx context.Context) error {
	repos, err := c.st.StoredRepositories(ctx)
	if err != nil {
		return err
	}
	c.rep.Repositories = len(repos)
	var exps map[digest.Digest]expand.Expansion // by layer
	if c.ex != nil {
		list, err := c.ex.Expansions()
		if err != nil {
			return err
		}
		exps = make(map[digest.Digest]expand.Expansion, len(list))
		for _, e := range list {
			exps[e.Layer] = e
		}
	}
	var profiles map[string][]expand.ProfileRecord // by repository key
	if c.ex != nil {
		profiles = map[string][]expand.ProfileRecord{}
		for _, p := range c.ex.ProfileRecords() {
			profiles[p.Key] = append(profiles[p.Key], p)
		}
	}

	// Blobs any repository still uses (or that are too young to judge).
	live := map[digest.Digest]bool{}
	liveProfileKeys := map[string]*repoMark{}
	for _, repo := range repos {
		if err := ctx.Err(); err != nil {
			return err
		}
		mark, err := c.markRepo(ctx, repo, exps, profiles[expand.ProfileKey(repo)])
		if err != nil {
			return fmt.Errorf("repository %s: %w", repo, err)
		}
		liveProfileKeys[expand.ProfileKey(repo)] = mark
		if err := c.sweepRepo(ctx, repo, mark, live); err != nil {
			return fmt.Errorf("repository %s: %w", repo, err)
		}
	}

	if c.ex != nil {
		// Expansions of layers no repository holds go; those of the
		// others keep their blobs.
		for layer, e := range exps {
			if live[layer] {
				live[e.Index], live[e.Data] = true, true
				continue
			}
			if e.ModTime.After(c.cutoff) {
				live[e.Index], live[e.Data] = true, true
				continue
			}
			c.rep.Expansions += c.removeLayerRecords(layer)
		}
		for _, layer := range c.ex.LayerRecords() {
			if !live[layer] {
				c.rep.Expansions += c.removeLayerRecords(layer)
			}
		}
		// Profiles of images gone (or of repositories gone).
		for key, recs := range profiles {
			mark := liveProfileKeys[key]
			for _, p := range recs {
				if mark != nil && mark.manifests[p.Manifest] || p.ModTime.After(c.cutoff) {
					if p.Pack != "" {
						live[p.Pack] = true
					}
					continue
				}
				c.log.Debug("gc: profile", "manifest", p.Manifest)
				if c.opts.DryRun || c.ex.RemoveProfile(p, c.cutoff) {
					c.rep.Profiles++
				}
			}
		}
		for _, d := range c.ex.CompressedIndexes() {
			if live[d] {
				continue
			}
			if c.opts.DryRun {
				c.rep.Indexes++
				continue
			}
			if n := c.ex.RemoveCompressedIndex(d, c.cutoff); n > 0 {
				c.rep.Indexes++
				c.rep.IndexBytes += n
			}
		}
	}

	blobs, err := c.st.Blobs(ctx)
	if err != nil {
		return err
	}
	for _, b := range blobs {
		if live[b.Digest] {
			continue
		}
		if b.ModTime.After(c.cutoff) {
			c.rep.Kept++
			continue
		}
		c.log.Debug("gc: blob", "digest", b.Digest, "size", b.Size)
		if c.opts.DryRun {
			c.rep.Blobs++
			c.rep.BlobBytes += b.Size
			continue
		}
		n, err := c.st.RemoveBlob(b.Digest, c.cutoff)
		if err != nil {
			return err
		}
		if n > 0 {
			c.rep.Blobs++
			c.rep.BlobBytes += n
		}
	}

	if !c.opts.DryRun {
		n, err := c.st.PurgeUploads(ctx, c.opts.UploadMaxAge)
		if err != nil {
			return err
		}
		c.rep.Uploads = n
		if c.rep.TempFiles, c.rep.TempBytes, err = c.st.RemoveTemp(c.cutoff); err != nil {
			return err
		}
		c.rep.EmptyRepos = c.st.RemoveEmptyRepositories(ctx)
	}
	return nil
}

func (c *collector) removeLayerRecords(layer digest.Digest) int {
	if c.opts.DryRun {
		return 1
	}
	return c.ex.RemoveLayerRecords(layer, c.cutoff)
}

// markRepo finds what is live in repo.
func (c *collector) markRepo(ctx context.Context, repo string, exps map[digest.Digest]expand.Expansion, profiles []expand.ProfileRecord) (*repoMark, error) {
	revs, err := c.st.Revisions(ctx, repo)
	if err != nil {
		return nil, err
	}
	refs := map[digest.Digest]store.References{}
	young := map[digest.Digest]bool{}
	for _, r := range revs {
		m, err := c.st.GetManifest(ctx, repo, r.Digest)
		if err != nil {
			continue // removed meanwhile, or its content lost
		}
		refs[r.Digest] = store.ParseReferences(m.Content)
		young[r.Digest] = r.ModTime.After(c.cutoff)
	}
	mark := &repoMark{manifests: map[digest.Digest]bool{}, blobs: map[digest.Digest]bool{}}
	var visit func(d digest.Digest)
	visit = func(d digest.Digest) {
		r, ok := refs[d]
		if !ok || mark.manifests[d] {
			return
		}
		mark.manifests[d] = true
		for _, b := range r.Blobs {
			mark.blobs[b] = true
		}
		for _, child := range r.Manifests {
			visit(child)
		}
	}
	// Roots.
	if c.opts.DeleteUntagged {
		tags, _ := c.st.Tags(ctx, repo)
		for _, t := range tags {
			if d, err := c.st.Resolve(ctx, repo, t); err == nil {
				visit(d)
			}
		}
	}
	for d, r := range refs {
		if young[d] || (!c.opts.DeleteUntagged && r.Subject == "") {
			visit(d)
		}
	}
	// Referrers of live manifests, until none is added.
	for changed := true; changed; {
		changed = false
		for d, r := range refs {
			if !mark.manifests[d] && r.Subject != "" && mark.manifests[r.Subject] {
				visit(d)
				changed = true
			}
		}
	}
	// Expansions of the repository's live layers, packs of its live
	// images' profiles.
	for b := range mark.blobs {
		if e, ok := exps[b]; ok {
			mark.blobs[e.Index], mark.blobs[e.Data] = true, true
		}
	}
	for _, p := range profiles {
		if p.Pack != "" && (mark.manifests[p.Manifest] || p.ModTime.After(c.cutoff)) {
			mark.blobs[p.Pack] = true
		}
	}
	// Manifests that are not live go (the sweep checks their age again).
	for d := range refs {
		if !mark.manifests[d] {
			mark.manifests[d] = false
		}
	}
	return mark, nil
}

// sweepRepo removes repo's dead manifests and links, and adds what repo
// keeps to live.
func (c *collector) sweepRepo(ctx context.Context, repo string, mark *repoMark, live map[digest.Digest]bool) error {
	dead := make([]digest.Digest, 0)
	for d, ok := range mark.manifests {
		if ok {
			live[d] = true // a manifest's content is a blob too
		} else {
			dead = append(dead, d)
		}
	}
	slices.Sort(dead)
	for _, d := range dead {
		c.log.Debug("gc: manifest", "repo", repo, "digest", d)
		if c.opts.DryRun {
			c.rep.Manifests++
			continue
		}
		ok, err := c.st.RemoveRevision(ctx, repo, d, c.cutoff)
		if err != nil {
			return err
		}
		if ok {
			c.rep.Manifests++
		} else {
			live[d] = true
		}
	}
	links, err := c.st.Links(ctx, repo)
	if err != nil {
		return err
	}
	for _, l := range links {
		if mark.blobs[l.Digest] {
			live[l.Digest] = true
			continue
		}
		if l.ModTime.After(c.cutoff) {
			live[l.Digest] = true // a push in progress
			continue
		}
		c.log.Debug("gc: link", "repo", repo, "digest", l.Digest)
		if c.opts.DryRun {
			c.rep.Links++
			continue
		}
		ok, err := c.st.RemoveLink(repo, l.Digest, c.cutoff)
		if err != nil {
			return err
		}
		if ok {
			c.rep.Links++
		} else {
			live[l.Digest] = true
		}
	}
	// Blobs a live manifest names but the repository does not link (a
	// mirror's manifests) stay too.
	for b := range mark.blobs {
		live[b] = true
	}
	return nil
}
