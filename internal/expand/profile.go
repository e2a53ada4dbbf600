package expand

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/layerindex"
)

// ErrNoProfile: no start-up profile is stored for the image.
var ErrNoProfile = errors.New("no start-up profile")

// ErrBadProfile wraps the reason a profile was refused.
var ErrBadProfile = errors.New("invalid start-up profile")

// maxProfileFrames bounds the frames a profile lists, all layers together.
const maxProfileFrames = 1 << 20

func (s *Service) profilePath(repo string, m digest.Digest) string {
	h := sha256.Sum256([]byte(repo))
	return filepath.Join(s.dir, "profiles", hex.EncodeToString(h[:16]), recordName(m))
}

// Profile returns the stored start-up profile of manifest m in repo, as
// stored (JSON), or ErrNoProfile.
func (s *Service) Profile(ctx context.Context, repo string, m digest.Digest) ([]byte, error) {
	if _, err := s.st.GetManifest(ctx, repo, m); err != nil {
		return nil, ErrNoProfile // the image is gone, and so is its profile
	}
	b, err := os.ReadFile(s.profilePath(repo, m))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoProfile
	}
	return b, err
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
	var old api.Profile
	if ob, err := os.ReadFile(path); err == nil && json.Unmarshal(ob, &old) != nil {
		old.Pack = nil
	}
	if err := atomicfile.Write(path, b); err != nil {
		return err
	}
	// The pack of the profile this one replaced leaves the repository.
	if old.Pack != nil && (p.Pack == nil || old.Pack.Digest != p.Pack.Digest) {
		s.st.DeleteBlob(ctx, repo, old.Pack.Digest)
	}
	return nil
}
