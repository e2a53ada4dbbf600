package expand

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

// ErrNoProfile: no start-up profile is stored for the image.
var ErrNoProfile = errors.New("no start-up profile")

// ErrBadProfile wraps the reason a profile was refused.
var ErrBadProfile = errors.New("invalid start-up profile")

// maxProfileFrames bounds the frames a profile lists, all layers together.
const maxProfileFrames = 1 << 20

func (s *Service) profilePath(repo string, m digest.Digest) string {
	return filepath.Join(s.dir, "profiles", ProfileKey(repo), recordName(m))
}

// Profile returns the stored start-up profile of manifest m in repo, as
// stored (JSON), or ErrNoProfile.
func (s *Service) Profile(ctx context.Context, repo string, m digest.Digest) ([]byte, error) {
	if _, err := s.st.GetManifest(ctx, repo, m); err != nil {
		return nil, ErrNoProfile // the image is gone, and so is its profile
	}
	b, err := os.ReadFile(s.profilePath(repo, m))
	if errors.Is(err, os.ErrNotExist) {
		b, err = s.referredProfile(ctx, repo, m)
		if errors.Is(err, ErrNoProfile) {
			return s.derivedProfile(ctx, repo, m)
		}
	}
	return b, err
}

// maxDerivedSources bounds the profiles derivedProfile reads (the most
// recent ones).
const maxDerivedSources = 256

// derivedProfile returns, for manifest m of repo that has no profile, the
// stored profile of another image of repo that shares the most of m's
// layers (by the frames it lists of them; the newest on a tie), marked
// Derived: a new version of an image (its base layers unchanged) starts
// with what the previous version's start read of them, pack included; a
// node ignores what it lists of layers the image does not have. Profiles
// of other repositories are not looked at: what an image's start reads is
// its repository's to see.
func (s *Service) derivedProfile(ctx context.Context, repo string, m digest.Digest) ([]byte, error) {
	man, err := s.st.GetManifest(ctx, repo, m)
	if err != nil {
		return nil, ErrNoProfile
	}
	layers := map[digest.Digest]bool{}
	for _, d := range store.ParseReferences(man.Content).Blobs {
		layers[d] = true
	}
	dir := filepath.Dir(s.profilePath(repo, m))
	ents, _ := os.ReadDir(dir)
	type cand struct {
		m     digest.Digest
		mtime time.Time
	}
	var cands []cand
	for _, e := range ents {
		d, ok := nameDigest(e.Name())
		if !ok || d == m {
			continue
		}
		if fi, err := e.Info(); err == nil {
			cands = append(cands, cand{d, fi.ModTime()})
		}
	}
	slices.SortFunc(cands, func(a, b cand) int { return b.mtime.Compare(a.mtime) })
	if len(cands) > maxDerivedSources {
		cands = cands[:maxDerivedSources]
	}
	var best *api.Profile
	bestScore := 0
	for _, c := range cands {
		if !s.st.HasManifest(repo, c.m) {
			continue // the image is gone
		}
		b, err := os.ReadFile(filepath.Join(dir, recordName(c.m)))
		var p api.Profile
		if err != nil || json.Unmarshal(b, &p) != nil || p.Version != layerindex.Version {
			continue
		}
		score := 0
		for _, l := range p.Layers {
			if layers[l.Layer] {
				score += len(l.Frames) + 1
			}
		}
		if score > bestScore { // newest first: a tie keeps the newer
			best, bestScore = &p, score
		}
	}
	if best == nil {
		return nil, ErrNoProfile
	}
	best.Derived = true
	return json.Marshal(best)
}

// PutProfile checks and stores the start-up profile p of manifest m in
// repo, replacing any before it. Every layer it names must be a layer of
// the image whose expansion has data blob Data; frame indexes must not be
// negative and are not more than maxProfileFrames in all; ranges must be in
// the data blob; ranks, if given, number all frames from 0; page ranges
// must be in the layer's uncompressed stream, and page ranks, if given,
// number them all from 0. The registry makes the pack of the pages
// (api.Pack) and stores it with the profile. A profile that
// fails is refused with an error wrapping ErrBadProfile (or
// store.ErrManifestUnknown).
func (s *Service) PutProfile(ctx context.Context, repo string, m digest.Digest, p *api.Profile) error {
	man, err := s.st.GetManifest(ctx, repo, m)
	if err != nil {
		return err
	}
	layers, err := imageLayers(man.Content)
	if err != nil || len(layers) == 0 {
		return fmt.Errorf("%w: %s is not an image manifest with layers", ErrBadProfile, m)
	}
	if p.Version != layerindex.Version {
		return fmt.Errorf("%w: format version %d, this registry serves %d", ErrBadProfile, p.Version, layerindex.Version)
	}
	n := 0
	seen := map[digest.Digest]bool{}
	mds := make([]*api.MountDescriptor, len(p.Layers))
	for i, l := range p.Layers {
		if !slices.Contains(layers, l.Layer) {
			return fmt.Errorf("%w: %s is not a layer of %s", ErrBadProfile, l.Layer, m)
		}
		if seen[l.Layer] {
			return fmt.Errorf("%w: layer %s listed twice", ErrBadProfile, l.Layer)
		}
		seen[l.Layer] = true
		md := s.done(l.Layer)
		if md == nil || md.Data.Digest != l.Data {
			return fmt.Errorf("%w: layer %s has no expansion with data blob %s", ErrBadProfile, l.Layer, l.Data)
		}
		mds[i] = md
		for _, k := range l.Frames {
			if k < 0 {
				return fmt.Errorf("%w: negative frame index", ErrBadProfile)
			}
		}
		if l.Ranges != nil && len(l.Ranges) != len(l.Frames) {
			return fmt.Errorf("%w: layer %s: %d ranges for %d frames", ErrBadProfile, l.Layer, len(l.Ranges), len(l.Frames))
		}
		for _, r := range l.Ranges {
			if r[0] < 0 || r[1] <= 0 || r[0]+r[1] > md.Data.Size || r[0]+r[1] < r[0] {
				return fmt.Errorf("%w: layer %s: range %v outside the data blob", ErrBadProfile, l.Layer, r)
			}
		}
		if l.Ranks != nil && len(l.Ranks) != len(l.Frames) {
			return fmt.Errorf("%w: layer %s: %d ranks for %d frames", ErrBadProfile, l.Layer, len(l.Ranks), len(l.Frames))
		}
		if n += len(l.Frames); n > maxProfileFrames {
			return fmt.Errorf("%w: more than %d frames", ErrBadProfile, maxProfileFrames)
		}
	}
	// Ranks, where given, number all the frames listed from 0, each once;
	// and so do page ranks the pages.
	var ranks, pageRanks []int
	pages := 0
	for _, l := range p.Layers {
		ranks = append(ranks, l.Ranks...)
		pageRanks = append(pageRanks, l.PageRanks...)
		if pages += len(l.Pages); pages > maxProfileFrames {
			return fmt.Errorf("%w: more than %d page ranges", ErrBadProfile, maxProfileFrames)
		}
	}
	if err := checkRanks(ranks, n, "frame"); err != nil {
		return err
	}
	if err := checkRanks(pageRanks, pages, "page"); err != nil {
		return err
	}
	p.Pack = nil // the registry's to make
	p.Derived = false
	path := s.profilePath(repo, m)
	if pages > 0 {
		ixs := make([]*layerindex.Index, len(p.Layers))
		for i := range p.Layers {
			l := &p.Layers[i]
			if len(l.Pages) == 0 {
				continue
			}
			ix, err := s.loadIndex(ctx, repo, mds[i])
			if err != nil {
				return fmt.Errorf("layer %s: index: %w", l.Layer, err)
			}
			if err := checkPages(l, ix); err != nil {
				return err
			}
			ixs[i] = ix
		}
		start := time.Now()
		pack, err := s.buildPack(ctx, repo, p, ixs, mds)
		if err != nil {
			// The profile is still worth its frames.
			s.log.Warn("start-up pack not made", "repo", repo, "manifest", m, "err", err)
		} else {
			s.log.Info("start-up pack made", "repo", repo, "manifest", m, "pack", pack.Digest,
				"bytes", pack.Size, "chunks", len(pack.Chunks), "took", time.Since(start))
			p = withPack(p, pack)
		}
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	// One profile write at a time: the pack a replaced profile leaves
	// behind is removed only if no other profile names it.
	s.profileMu.Lock()
	var old api.Profile
	if ob, err := os.ReadFile(path); err == nil && json.Unmarshal(ob, &old) != nil {
		old.Pack = nil
	}
	if err := atomicfile.Write(path, b); err != nil {
		s.profileMu.Unlock()
		return err
	}
	// The pack of the profile this one replaced leaves the repository,
	// unless another image's profile there has the same pack.
	if old.Pack != nil && (p.Pack == nil || old.Pack.Digest != p.Pack.Digest) && !packNamed(filepath.Dir(path), old.Pack.Digest) {
		s.st.DeleteBlob(ctx, repo, old.Pack.Digest)
	}
	s.profileMu.Unlock()
	if err := s.publishProfile(ctx, repo, man, b, p.Pack); err != nil {
		s.log.Warn("start-up profile not published as a referrer", "repo", repo, "manifest", m, "err", err)
	}
	return nil
}

// packNamed reports whether a profile in dir (one repository's) names
// pack d.
func packNamed(dir string, d digest.Digest) bool {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if _, ok := nameDigest(e.Name()); !ok {
			continue // artifact records, temporary files
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		var p api.Profile
		if err != nil || json.Unmarshal(b, &p) != nil {
			continue
		}
		if p.Pack != nil && p.Pack.Digest == d {
			return true
		}
	}
	return false
}

// publishProfile publishes profile b of manifest man (and its pack) as a
// profile artifact referring to it, so that clients that copy an image
// with its referrers (oras cp -r) carry it to any registry; the artifact
// of the profile it replaces is removed.
func (s *Service) publishProfile(ctx context.Context, repo string, man store.Manifest, b []byte, pack *api.Pack) error {
	pd := ocispec.Descriptor{MediaType: api.MediaTypeProfile, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := s.st.PutBlob(ctx, repo, pd.Digest, pd.Size, bytes.NewReader(b)); err != nil {
		return err
	}
	var packDesc *ocispec.Descriptor
	if pack != nil {
		packDesc = &ocispec.Descriptor{MediaType: api.MediaTypePack, Digest: pack.Digest, Size: pack.Size}
	}
	empty := ocispec.DescriptorEmptyJSON
	if err := s.st.PutBlob(ctx, repo, empty.Digest, empty.Size, bytes.NewReader(empty.Data)); err != nil {
		return err
	}
	art, err := api.ProfileArtifact(ocispec.Descriptor{MediaType: man.MediaType, Digest: man.Digest, Size: int64(len(man.Content))}, pd, packDesc)
	if err != nil {
		return err
	}
	ad := digest.FromBytes(art)
	err = s.st.PutManifest(ctx, repo,
		store.Manifest{Digest: ad, MediaType: ocispec.MediaTypeImageManifest, Content: art, Subject: man.Digest},
		store.ManifestMeta{Subject: man.Digest, ArtifactType: api.ArtifactTypeProfile}, nil)
	if err != nil {
		return err
	}
	side := s.profilePath(repo, man.Digest) + ".artifact"
	if old, err := os.ReadFile(side); err == nil {
		if od, err := digest.Parse(string(old)); err == nil && od != ad {
			s.st.DeleteManifest(ctx, repo, od)
		}
	}
	return atomicfile.Write(side, []byte(ad.String()))
}

// referredProfile returns the profile of a profile artifact in repo that
// refers to manifest m (one a client copied here with the image), without
// its pack: this registry did not make it, and its bytes are checked only
// against digests the profile gives.
func (s *Service) referredProfile(ctx context.Context, repo string, m digest.Digest) ([]byte, error) {
	refs, err := s.st.Referrers(ctx, repo, m)
	if err != nil {
		return nil, ErrNoProfile
	}
	for _, d := range refs {
		if d.ArtifactType != api.ArtifactTypeProfile {
			continue
		}
		am, err := s.st.GetManifest(ctx, repo, d.Digest)
		if err != nil {
			continue
		}
		pd, _, err := api.ParseProfileArtifact(am.Content, m)
		if err != nil {
			continue
		}
		f, err := s.st.OpenBlob(ctx, repo, pd.Digest)
		if err != nil {
			continue
		}
		b, err := io.ReadAll(io.LimitReader(f, api.MaxProfileBytes+1))
		f.Close()
		var p api.Profile
		if err != nil || len(b) > api.MaxProfileBytes || json.Unmarshal(b, &p) != nil {
			continue
		}
		p.Pack = nil
		return json.Marshal(&p)
	}
	return nil, ErrNoProfile
}
