package node

import (
	"context"
	"errors"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// cachedProfile is a start-up profile MountLayer looked for (nil: none).
type cachedProfile struct {
	p  *api.Profile
	at time.Time
}

// mountProfileTTL is how long MountLayer keeps the answer for a manifest:
// the snapshotter mounts an image's layers one by one, within seconds.
const mountProfileTTL = time.Minute

// mountProfile returns the start-up profile of image manifest in repo for
// MountLayer (the containerd snapshotter, which mounts an image's layers
// one by one, with no container start to hang a profile on): each layer
// mounted prefetches the frames the profile lists for it. It is asked for
// once per manifest and kept a minute; nil when the registry has none,
// when profiles are off, or when the manifest is unknown. The snapshotter
// uses profiles; it does not record them (a start there is not seen).
func (m *Manager) mountProfile(ctx context.Context, repo remote.Repository, manifest digest.Digest) *api.Profile {
	if manifest == "" || m.opts.Profiles == ProfilesOff {
		return nil
	}
	k := repo.String() + "@" + manifest.String()
	m.mu.Lock()
	c, ok := m.mountProfiles[k]
	m.mu.Unlock()
	if ok && time.Since(c.at) < mountProfileTTL {
		return c.p
	}
	var p *api.Profile
	var err error
	if lazy, _ := m.offersMounts(ctx, repo.Registry); lazy {
		p, err = m.client.Profile(ctx, repo, manifest)
	} else {
		p, err = m.client.ProfileReferrer(ctx, repo, manifest)
	}
	switch {
	case err == nil && p.Version != layerindex.Version:
		p = nil
	case err != nil:
		if !errors.Is(err, remote.ErrNotFound) {
			m.log.Debug("no start-up profile for a layer mount", "repo", repo, "manifest", manifest, "err", err)
		}
		p = nil
	}
	m.mu.Lock()
	for k, c := range m.mountProfiles {
		if time.Since(c.at) >= mountProfileTTL {
			delete(m.mountProfiles, k)
		}
	}
	m.mountProfiles[k] = cachedProfile{p: p, at: time.Now()}
	m.mu.Unlock()
	return p
}
