package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/startup"
)

// Lease keeps an image's layers mounted.
type Lease struct {
	ID     string   `json:"id"`
	Ref    string   `json:"ref"`
	Image  *Image   `json:"image"`
	Lowers []string `json:"lowers"` // top first
	// Union is the read-only union mount point of a `strata mount`.
	Union string `json:"union,omitempty"`
	// PID, if set, is the process holding the lease; the lease ends when it dies.
	PID int `json:"pid,omitempty"`
}

// restore re-establishes the leases recorded on disk: union mounts are
// mounted again; containers' leases keep their layers mounted.
func (m *Manager) restore(ctx context.Context) {
	paths, _ := filepath.Glob(filepath.Join(m.root, "leases", "*.json"))
	for _, p := range paths {
		var l Lease
		b, err := os.ReadFile(p)
		if err == nil {
			err = json.Unmarshal(b, &l)
		}
		if err != nil || l.Image == nil {
			m.log.Warn("dropping unreadable lease", "path", p, "err", err)
			os.Remove(p)
			continue
		}
		if l.PID > 0 && !alive(l.PID) {
			os.Remove(p)
			continue
		}
		m.reachAsPulled(l.Image)
		_, err = m.acquire(ctx, l.ID, l.Image, l.Union, l.PID, false)
		if errors.Is(err, errNotPulled) {
			// A saved index lost to a crash: fetch the image's indexes
			// again (those intact are kept) and mount.
			m.log.Warn("fetching indexes again", "id", l.ID, "ref", l.Ref, "err", err)
			if err = m.refetchIndexes(ctx, l.Image); err == nil {
				_, err = m.acquire(ctx, l.ID, l.Image, l.Union, l.PID, false)
			}
		}
		if err != nil {
			m.log.Warn("cannot restore lease", "id", l.ID, "err", err)
			os.Remove(p)
			continue
		}
		m.log.Info("restored lease", "id", l.ID, "ref", l.Ref, "union", l.Union)
	}
}

func alive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", fmt.Sprint(pid)))
	return err == nil
}

// An AcquireRequest asks for a lease on an image's layers.
type AcquireRequest struct {
	// ID names the lease: container:<id> or mount:<dir>.
	ID string `json:"id"`
	// Ref is the image, pulled first if the node has no record of it.
	Ref string `json:"ref"`
	// Union, if set, is where a read-only union of the image is mounted.
	Union string `json:"union,omitempty"`
	// PID, if set, ends the lease when that process exits.
	PID int `json:"pid,omitempty"`
}

// Acquire mounts the layers of req.Ref (pulling if needed) and records
// lease req.ID.
func (m *Manager) Acquire(ctx context.Context, req AcquireRequest) (*Lease, error) {
	id, ref, union, pid := req.ID, req.Ref, req.Union, req.PID
	img, err := m.image(ctx, ref)
	if err != nil {
		return nil, err
	}
	lease, err := m.acquire(ctx, id, img, union, pid, true)
	if errors.Is(err, errNotPulled) {
		// A saved index lost to a crash: pull again (it fetches only
		// what is missing) and mount.
		m.log.Warn("pulling again", "ref", ref, "err", err)
		if img, err = m.Pull(ctx, ref); err != nil {
			return nil, err
		}
		lease, err = m.acquire(ctx, id, img, union, pid, true)
	}
	return lease, err
}

// acquire mounts img's layers for lease id. starting says a container (or
// union) is starting now, not being restored after a restart: its image's
// start-up profile is prefetched, or recorded when the registry has none.
func (m *Manager) acquire(ctx context.Context, id string, img *Image, union string, pid int, starting bool) (*Lease, error) {
	m.busy() // a start: no background work for a while
	m.mu.Lock()
	if _, ok := m.leases[id]; ok {
		m.mu.Unlock()
		return nil, fmt.Errorf("lease %s exists", id)
	}
	m.mu.Unlock()
	var profile *api.Profile // what the start prefetches
	if starting && m.opts.Profiles != ProfilesOff && img.Profile != nil {
		profile = img.Profile
		m.starts.StartPack(remote.Repository{Registry: img.Registry, Name: img.Repo}, profile, img.Layers, nil)
	}
	got, release, err := m.refLayers(ctx, img, profile)
	if err != nil {
		return nil, err
	}
	lease := &Lease{ID: id, Ref: img.Ref, Image: img, PID: pid}
	for i := len(got) - 1; i >= 0; i-- {
		lease.Lowers = append(lease.Lowers, got[i].dir)
	}
	if union != "" {
		if err := m.mounter.MountUnion(union, lease.Lowers); err != nil {
			release()
			return nil, fmt.Errorf("union mount at %s: %w", union, err)
		}
		lease.Union = union
	}
	b, _ := json.MarshalIndent(lease, "", "  ")
	if err := atomicfile.Write(filepath.Join(m.root, "leases", leaseFile(id)), b); err != nil {
		if union != "" {
			m.mounter.Unmount(union, true)
		}
		release()
		return nil, err
	}
	m.mu.Lock()
	m.leases[id] = lease
	m.mu.Unlock()
	if starting && union == "" {
		m.beginStart(id, img, got, profile)
	}
	return lease, nil
}

// refLayers mounts the layers of img at once (each mount reads its saved
// index and starts a FUSE server) and takes a reference on each; release
// drops them. The layers' frames that profile lists are prefetched. A
// failure releases the ones that succeeded.
func (m *Manager) refLayers(ctx context.Context, img *Image, profile *api.Profile) (got []*layer, release func(), err error) {
	got = make([]*layer, len(img.Layers))
	errs := make([]error, len(img.Layers))
	forEach(ctx, len(img.Layers), pullConcurrency, func(i int) {
		got[i], errs[i] = m.ref(ctx, img, img.Layers[i], profile)
	})
	release = func() {
		for _, l := range got {
			if l != nil {
				m.unref(l)
			}
		}
	}
	err = errors.Join(errs...)
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		release()
		return nil, nil, err
	}
	return got, release, nil
}

// beginStart prepares the layers got of img for a container that starts
// now (lease id): its reads are recorded into the image's start-up profile
// when the registry has none; and the kernel's readahead is narrowed for a
// start that records, or that prefetches a profile (profile) not on the
// node yet.
func (m *Manager) beginStart(id string, img *Image, got []*layer, profile *api.Profile) {
	record := img.Unprofiled && (img.Profile == nil || img.Profile.Derived) && m.opts.Profiles == ProfilesAuto
	for _, l := range got {
		// Only a start whose reads go into a profile, or come from one
		// that is not on the node yet, fetches what readahead widens.
		if record || profile != nil && l.fs != nil && !l.fs.Cached(startup.ProfileFrames(profile, l.digest, l.fs.Index().Data)) {
			m.narrowReadahead(l)
		}
	}
	if !record {
		return
	}
	var lazy []startup.Layer
	for _, l := range got {
		if l.fs != nil {
			lazy = append(lazy, startup.Layer{Digest: l.digest, FS: l.fs})
		}
	}
	target := startup.Target{Ref: img.Ref, Repo: remote.Repository{Registry: img.Registry, Name: img.Repo}, Manifest: img.Digest,
		Referrers: img.Source == SourceReferrers}
	m.starts.Record(id, target, lazy)
}

func leaseFile(id string) string {
	h := sha256.Sum256([]byte(id))
	return hex.EncodeToString(h[:12]) + ".json"
}

// Release ends lease id: its union is unmounted and its layers unreferenced
// (unmounted when no other lease uses them).
func (m *Manager) Release(ctx context.Context, id string) error {
	m.mu.Lock()
	lease, ok := m.leases[id]
	delete(m.leases, id)
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("no lease %s", id)
	}
	if lease.Union != "" {
		if err := m.mounter.Unmount(lease.Union, false); err != nil {
			m.log.Warn("union busy, detaching", "dir", lease.Union, "err", err)
			m.mounter.Unmount(lease.Union, true)
		}
	}
	os.Remove(filepath.Join(m.root, "leases", leaseFile(id)))
	go m.starts.Finish(id)
	for _, d := range lease.Image.Layers {
		m.mu.Lock()
		l := m.layers[d.Digest]
		m.mu.Unlock()
		if l != nil {
			m.unref(l)
		}
	}
	return nil
}

// LeaseByUnion finds the lease of a union mount point.
func (m *Manager) LeaseByUnion(dir string) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, l := range m.leases {
		if l.Union == dir {
			return id, true
		}
	}
	return "", false
}

// Leases returns the current leases.
func (m *Manager) Leases() []*Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*Lease, 0, len(m.leases))
	for _, l := range m.leases {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// ReapDead ends leases whose holder process has exited.
func (m *Manager) ReapDead(ctx context.Context) {
	for _, l := range m.Leases() {
		if l.PID > 0 && !alive(l.PID) {
			m.log.Info("releasing the lease of an exited process", "id", l.ID, "pid", l.PID)
			m.Release(ctx, l.ID)
		}
	}
}
