// Package node is the node's layer mount manager: it resolves images, asks
// the registry for layer mounts, mounts each expanded layer once (FUSE,
// shared, refcounted), falls back to pulling and unpacking layers from
// registries without layer mounts, and holds the leases that keep layers
// mounted while containers and union mounts use them.
//
// State under the node root:
//
//	<root>/
//	  cache/                       the verified content cache (package cache)
//	  layers/<alg>-<hex>/index     a layer's index blob, verified, bound to the layer digest
//	  layers/<alg>-<hex>/mnt/      the layer's FUSE mount point (while mounted)
//	  layers/<alg>-<hex>/fs/       a fallback layer's unpacked tree
//	  images/<hash of ref>.json    a pulled image: reference, digest, config, layers, mode
//	  leases/<id>.json             what holds layers mounted: a container or a union mount
//	  strata.sock, daemon.pid      the node daemon (package node's Serve)
package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/overlay"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/startup"
	"github.com/strata-oci/strata/internal/unpack"
	"github.com/strata-oci/strata/layerindex"
)

// Modes of a pulled layer.
const (
	ModeLazy     = "lazy"     // layer mount from the registry's expansion, FUSE
	ModeUnpacked = "unpacked" // fallback: downloaded and unpacked
)

// Options configure a Manager.
type Options struct {
	Root      string
	CacheSize int64
	Logger    *slog.Logger
	// Remote is the registry client. Its Hosts resolver is the node's:
	// a registry a request reaches over plain HTTP is marked there
	// (AllowPlainHTTP), and so is one an image was pulled from that way
	// when its lease is restored.
	Remote *remote.Client
	// FetchTimeout bounds a read that must fetch from the registry; past it
	// the read fails with EIO (0: layerfs's default).
	FetchTimeout time.Duration
	// Profiles is what the node does with start-up profiles (see
	// api.Profile): ProfilesAuto (the default) prefetches an image's
	// profile when a container starts, and records and stores one when
	// the registry has none; ProfilesUse only prefetches; ProfilesOff
	// neither asks for nor records them.
	Profiles string
	// ProfileWindow is how long after a container starts its reads are
	// recorded into a new profile (default 10 s; the recording also ends
	// when the container's lease does).
	ProfileWindow time.Duration
	// Linger is how long a lazy layer stays mounted after the last lease
	// using it ends: a container started meanwhile finds it mounted, with
	// the kernel's caches of its names, attributes and pages intact (0:
	// unmounted at once).
	Linger time.Duration
	// CompleteMax is the largest file of a lazy layer that the node puts
	// whole into its cache in the background after a container read part
	// of it, so that later opens read the cache directly (passthrough;
	// see layerfs.Completer). 0: 256 MiB; never more than a quarter of
	// CacheSize; negative: none.
	CompleteMax int64
}

// Values of Options.Profiles.
const (
	ProfilesAuto = "auto"
	ProfilesUse  = "use"
	ProfilesOff  = "off"
)

// Manager mounts layers and keeps track of who uses them.
type Manager struct {
	opts   Options
	root   string
	log    *slog.Logger
	cache  *cache.Cache
	client *remote.Client
	// complete puts files read from lazy layers whole into the cache in
	// the background; nil if Options.CompleteMax < 0.
	complete *layerfs.Completer
	// fetchedMu serializes addFetched.
	fetchedMu sync.Mutex

	mu     sync.Mutex
	info   map[string]bool // registry → offers layer mounts
	layers map[digest.Digest]*layer
	leases map[string]*Lease
	// downloads in progress (fallback pulls), for progress bars
	downloads map[digest.Digest]*Download
	// decoded indexes saved by a pull, for the mount that follows
	decoded map[digest.Digest]*layerindex.Index

	// starts fetches what start-up profiles list and records them.
	starts *startup.Profiles
}

// Download is the progress of one fallback layer download.
type Download struct {
	Layer digest.Digest `json:"layer"`
	Done  int64         `json:"done"`
	Total int64         `json:"total"`
}

func (m *Manager) setProgress(d digest.Digest, done, total int64) {
	m.mu.Lock()
	m.downloads[d] = &Download{Layer: d, Done: done, Total: total}
	m.mu.Unlock()
}

func (m *Manager) endProgress(d digest.Digest) {
	m.mu.Lock()
	delete(m.downloads, d)
	m.mu.Unlock()
}

// Downloads returns the fallback downloads in progress.
func (m *Manager) Downloads() []Download {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Download, 0, len(m.downloads))
	for _, d := range m.downloads {
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Layer < out[j].Layer })
	return out
}

// layer is a mounted layer.
type layer struct {
	digest digest.Digest
	mode   string
	dir    string // what overlay uses as a lower
	refs   int
	server *layerfs.Server   // lazy layers
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

// Image is a pulled image as the node records it.
type Image struct {
	Ref      string               `json:"ref"`
	Digest   digest.Digest        `json:"digest"`
	Registry string               `json:"registry"`
	Repo     string               `json:"repo"`
	Config   ocispec.Image        `json:"config"`
	Layers   []ocispec.Descriptor `json:"layers"` // bottom first, as in the manifest
	Mode     string               `json:"mode"`
	Pulled   time.Time            `json:"pulled"`
	// Reason says why the fallback was taken.
	Reason string `json:"reason,omitempty"`
	// Profile is the image's start-up profile from the registry, if it
	// has one; Unprofiled records that the registry has none (so the
	// first container records one).
	Profile    *api.Profile `json:"profile,omitempty"`
	Unprofiled bool         `json:"unprofiled,omitempty"`
	// PlainHTTP: the image was pulled over plain HTTP (--plain-http).
	PlainHTTP bool `json:"plainHTTP,omitempty"`
}

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

// Open opens the node state at opts.Root, cleaning up after a crashed
// process: stale FUSE mounts are detached, then leases are restored.
func Open(ctx context.Context, opts Options) (*Manager, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Profiles == "" {
		opts.Profiles = ProfilesAuto
	}
	for _, d := range []string{"layers", "images", "leases", "cache"} {
		if err := os.MkdirAll(filepath.Join(opts.Root, d), 0o755); err != nil {
			return nil, fmt.Errorf("node root: %w", err)
		}
	}
	c, err := cache.Open(filepath.Join(opts.Root, "cache"), cache.Options{MaxBytes: opts.CacheSize, Logger: log})
	if err != nil {
		return nil, err
	}
	m := &Manager{
		opts: opts, root: opts.Root, log: log, cache: c,
		info:   map[string]bool{},
		layers: map[digest.Digest]*layer{}, leases: map[string]*Lease{},
		downloads: map[digest.Digest]*Download{},
		decoded:   map[digest.Digest]*layerindex.Index{},
	}
	m.client = opts.Remote
	if m.client == nil {
		m.client = remote.New(remote.Options{Logger: log, Hosts: &remote.Hosts{}})
	}
	if m.client.Hosts() == nil {
		return nil, errors.New("node: the registry client has no Hosts resolver")
	}
	m.starts = startup.New(startup.Options{
		Client: m.client, Cache: c, Logger: log, FetchTimeout: opts.FetchTimeout, Window: opts.ProfileWindow,
		Prefetch: m.prefetchMounted, Stored: m.profileStored,
	})
	if opts.CompleteMax >= 0 {
		// A completed file must not push a bounded cache's working set out.
		maxFile := opts.CompleteMax
		if maxFile == 0 {
			maxFile = 256 << 20
		}
		if opts.CacheSize > 0 {
			maxFile = min(maxFile, opts.CacheSize/4)
		}
		m.complete = layerfs.NewCompleter(layerfs.CompleterOptions{Logger: log, MaxFile: maxFile, Fetched: m.addFetched})
	}
	m.cleanStale()
	m.restore(ctx)
	return m, nil
}

// cleanStale detaches mounts a crashed daemon left: union mounts of leases
// first, then layer FUSE mounts.
func (m *Manager) cleanStale() {
	leases, _ := filepath.Glob(filepath.Join(m.root, "leases", "*.json"))
	for _, p := range leases {
		var l Lease
		if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &l) == nil && l.Union != "" {
			overlay.Unmount(l.Union, true)
		}
	}
	mnts, _ := filepath.Glob(filepath.Join(m.root, "layers", "*", "mnt"))
	for _, p := range mnts {
		overlay.Unmount(p, true)
	}
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
		if l.Image.PlainHTTP {
			// Its layers' frames come from where the image was pulled.
			m.client.Hosts().AllowPlainHTTP(l.Image.Registry)
		}
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

// refetchIndexes fetches the saved indexes of img's lazy layers that are
// missing or damaged.
func (m *Manager) refetchIndexes(ctx context.Context, img *Image) error {
	diffIDs := img.Config.RootFS.DiffIDs
	if len(diffIDs) != len(img.Layers) {
		return fmt.Errorf("image %s: %d diff IDs for %d layers", img.Ref, len(diffIDs), len(img.Layers))
	}
	if img.PlainHTTP {
		m.client.Hosts().AllowPlainHTTP(img.Registry)
	}
	repo := remote.Repository{Registry: img.Registry, Name: img.Repo}
	for i, l := range img.Layers {
		if _, err := os.Stat(filepath.Join(layerDir(m.root, l.Digest), "unpacked")); err == nil {
			continue
		}
		if err := m.fetchIndex(ctx, repo, l, diffIDs[i]); err != nil {
			return err
		}
	}
	return nil
}

func alive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", fmt.Sprint(pid)))
	return err == nil
}

func layerDir(root string, d digest.Digest) string {
	return filepath.Join(root, "layers", string(d.Algorithm())+"-"+d.Encoded())
}

func imagePath(root, ref string) string {
	h := sha256.Sum256([]byte(ref))
	return filepath.Join(root, "images", hex.EncodeToString(h[:12])+".json")
}

// Pull resolves ref and makes every layer available: a layer mount when
// the registry offers one, else a download and unpack. It records the image.
// The registry is reached as the client's Hosts say.
func (m *Manager) Pull(ctx context.Context, ref string) (*Image, error) {
	r, err := remote.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	if m.complete != nil {
		m.complete.Busy()
	}
	// The requests that depend only on the manifest go out as soon as it
	// is verified, alongside the config: whether the registry offers layer
	// mounts (asked once per registry, from the start), the start-up
	// profile, and every layer's mount and index (a bounded number at a
	// time), so a many-layer image costs no round trip per layer. The
	// indexes are bound to the config's diff IDs once it is there.
	offer := sync.OnceValues(func() (bool, string) { return m.offersMounts(ctx, r.Registry) })
	go offer()
	// The requests that follow the manifest go out together, each on a
	// connection of its own: open those now, while the manifest is on
	// its way.
	m.client.Preconnect(r.Registry, preconnect)
	var (
		early       []*earlyIndex
		profile     *api.Profile
		unprofiled  bool
		profileDone = make(chan struct{})
	)
	start := time.Now()
	img, err := m.client.ResolveWith(ctx, r, func(md digest.Digest, man *ocispec.Manifest) {
		m.log.Debug("pull: manifest verified", "ref", ref, "after", time.Since(start))
		early = make([]*earlyIndex, len(man.Layers))
		for i := range early {
			early[i] = &earlyIndex{done: make(chan struct{})}
		}
		layers := man.Layers
		indexesIn := make(chan struct{})
		go func() {
			lazy, _ := offer()
			if !lazy || m.opts.Profiles == ProfilesOff {
				close(profileDone)
			} else {
				go func() {
					defer close(profileDone)
					// Its pack (or its frames) are fetched now,
					// alongside the indexes, not once they are there.
					profile, unprofiled = m.starts.Fetch(ctx, r.Repository, md, man.Layers, indexesIn)
					m.log.Debug("pull: start-up profile", "ref", ref, "after", time.Since(start), "found", profile != nil)
				}()
			}
			forEach(ctx, len(layers), pullConcurrency, func(i int) {
				e := early[i]
				defer close(e.done)
				if lazy {
					e.md, e.raw, e.ix, e.err = m.getIndex(ctx, r.Repository, layers[i])
					m.log.Debug("pull: index", "layer", layers[i].Digest, "after", time.Since(start), "err", e.err)
				}
			})
			for _, e := range early { // those skipped when ctx ended
				select {
				case <-e.done:
				default:
					e.err = ctx.Err()
					close(e.done)
				}
			}
			close(indexesIn)
		}()
	})
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", ref, err)
	}
	if len(img.Config.RootFS.DiffIDs) != len(img.Manifest.Layers) {
		return nil, fmt.Errorf("image %s: config lists %d diff IDs for %d layers", ref, len(img.Config.RootFS.DiffIDs), len(img.Manifest.Layers))
	}
	rec := &Image{
		Ref: r.String(), Digest: img.Digest, Registry: r.Registry, Repo: r.Name,
		Config: img.Config, Layers: img.Manifest.Layers, Mode: ModeLazy, Pulled: time.Now().UTC(),
		PlainHTTP: m.client.Hosts().Lookup(r.Registry).PlainHTTP,
	}
	lazy, reason := offer()
	layers := img.Manifest.Layers
	unpackAll := !lazy
	errs := make([]error, len(layers))
	if lazy {
		for i, e := range early {
			select {
			case <-e.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if errs[i] = e.err; e.err == nil && e.raw != nil {
				errs[i] = m.saveIndex(layers[i], img.Config.RootFS.DiffIDs[i], e.md, e.raw, e.ix)
			}
		}
	}
	var fallback []int
	for i, err := range errs {
		switch {
		case unpackAll:
			fallback = append(fallback, i)
		case err == nil:
		case errors.Is(err, remote.ErrExpansionFailed) || errors.Is(err, remote.ErrNotFound):
			// This layer is pulled the ordinary way; the others stay
			// layer mounts.
			if lazy {
				lazy, reason = false, fmt.Sprintf("layer %s has no layer mount: %v", layers[i].Digest, err)
			}
			fallback = append(fallback, i)
		default:
			return nil, err
		}
	}
	errs = make([]error, len(fallback))
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
	<-profileDone
	rec.Profile, rec.Unprofiled = profile, unprofiled
	if !lazy {
		rec.Mode, rec.Reason = ModeUnpacked, reason
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	if err := atomicfile.Write(imagePath(m.root, rec.Ref), b); err != nil {
		return nil, err
	}
	return rec, nil
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

// An earlyIndex is a layer's index fetched before the image's config is
// there (see Pull).
type earlyIndex struct {
	done chan struct{}
	md   *api.MountDescriptor
	raw  []byte // nil: the node has the index already
	ix   *layerindex.Index
	err  error
}

// fetchIndex gets the layer's mount descriptor and index, verifies the index
// against the descriptor and binds it to the layer and diff ID the image
// names, and saves it.
func (m *Manager) fetchIndex(ctx context.Context, repo remote.Repository, l ocispec.Descriptor, diffID digest.Digest) error {
	md, raw, ix, err := m.getIndex(ctx, repo, l)
	if err != nil || raw == nil {
		return err
	}
	return m.saveIndex(l, diffID, md, raw, ix)
}

// getIndex asks for layer l's mount and fetches and decodes its index; raw
// is nil when the node has the index already.
func (m *Manager) getIndex(ctx context.Context, repo remote.Repository, l ocispec.Descriptor) (md *api.MountDescriptor, raw []byte, ix *layerindex.Index, err error) {
	if _, err := m.savedIndex(l.Digest); err == nil {
		return nil, nil, nil, nil
	}
	// One request for the index; the mount descriptor is what it names.
	d, raw, err := m.client.LayerIndex(ctx, repo, l.Digest)
	if err == nil {
		if ix, err = layerindex.Decode(raw); err != nil {
			return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
		}
		if ix.Layer != l.Digest {
			return nil, nil, nil, fmt.Errorf("layer %s: the registry's index is for layer %s", l.Digest, ix.Layer)
		}
		md = &api.MountDescriptor{
			Layer: l.Digest, DiffID: ix.DiffID, Version: ix.Version,
			Index: ocispec.Descriptor{MediaType: layerindex.MediaTypeIndex, Digest: d, Size: int64(len(raw))},
			Data:  ocispec.Descriptor{MediaType: layerindex.MediaTypeData, Digest: ix.Data, Size: ix.DataSize},
		}
		return md, raw, ix, nil
	}
	if !errors.Is(err, remote.ErrUnsupported) && !errors.Is(err, remote.ErrDigestMismatch) {
		return nil, nil, nil, err
	}
	m.log.Debug("index route unavailable, asking for the layer mount", "layer", l.Digest, "err", err)
	md, err = m.client.Mount(ctx, repo, l.Digest)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer mount %s: %w", l.Digest, err)
	}
	rc, err := m.client.FetchBlob(ctx, repo, md.Index)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	raw, err = io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	if ix, err = layerindex.Decode(raw); err != nil {
		return nil, nil, nil, fmt.Errorf("layer %s index: %w", l.Digest, err)
	}
	return md, raw, ix, nil
}

// saveIndex binds index ix (raw) of layer l to l, diffID and the mount
// descriptor's data blob, and saves it; the decoded index is kept for the
// layer's mount.
func (m *Manager) saveIndex(l ocispec.Descriptor, diffID digest.Digest, md *api.MountDescriptor, raw []byte, ix *layerindex.Index) error {
	if ix.Layer != l.Digest || ix.DiffID != diffID || ix.Data != md.Data.Digest || ix.DataSize != md.Data.Size {
		return fmt.Errorf("layer %s: the registry's expansion is not bound to this image (index names layer %s, diff ID %s)", l.Digest, ix.Layer, ix.DiffID)
	}
	dir := layerDir(m.root, l.Digest)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// Neither is synced (a start waits for these writes, and with 24
	// layers their syncs took 120 ms here): savedIndex verifies the index
	// against the digest mount.json names, and a layer whose saved index
	// is damaged after a crash is fetched again.
	if err := atomicfile.WriteUnsynced(filepath.Join(dir, "index"), raw); err != nil {
		return err
	}
	meta, _ := json.Marshal(md)
	if err := atomicfile.WriteUnsynced(filepath.Join(dir, "mount.json"), meta); err != nil {
		return err
	}
	m.mu.Lock()
	if len(m.decoded) < maxDecoded {
		m.decoded[l.Digest] = ix
	}
	m.mu.Unlock()
	return nil
}

// preconnect is the number of connections a pull opens ahead: the
// config, the start-up profile, and a few layer mounts and indexes.
const preconnect = 4

// savedIndex reads layer d's saved index and verifies it against the
// digest of its saved mount descriptor.
func (m *Manager) savedIndex(d digest.Digest) ([]byte, error) {
	dir := layerDir(m.root, d)
	meta, err := os.ReadFile(filepath.Join(dir, "mount.json"))
	if err != nil {
		return nil, err
	}
	var md api.MountDescriptor
	if err := json.Unmarshal(meta, &md); err != nil || md.Index.Digest.Validate() != nil {
		return nil, fmt.Errorf("saved mount descriptor of %s is damaged", d)
	}
	b, err := os.ReadFile(filepath.Join(dir, "index"))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != md.Index.Size || md.Index.Digest.Algorithm().FromBytes(b) != md.Index.Digest {
		return nil, fmt.Errorf("saved index of %s is damaged", d)
	}
	return b, nil
}

// maxDecoded bounds the decoded indexes kept between a pull and a mount.
const maxDecoded = 256

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
	if st.DiffID != diffID {
		os.RemoveAll(fs)
		return fmt.Errorf("layer %s: unpacked content is %s, the image config says %s", l.Digest, st.DiffID, diffID)
	}
	return atomicfile.Write(filepath.Join(dir, "unpacked"), []byte(st.DiffID.String()))
}

// Images lists pulled images.
func (m *Manager) Images() ([]*Image, error) {
	paths, _ := filepath.Glob(filepath.Join(m.root, "images", "*.json"))
	var out []*Image
	for _, p := range paths {
		var img Image
		if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &img) == nil {
			out = append(out, &img)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// image returns the recorded image for ref, pulling it if needed.
func (m *Manager) image(ctx context.Context, ref string) (*Image, error) {
	if r, err := remote.ParseReference(ref); err == nil {
		if b, err := os.ReadFile(imagePath(m.root, r.String())); err == nil {
			var img Image
			if json.Unmarshal(b, &img) == nil {
				return &img, nil
			}
		}
	}
	return m.Pull(ctx, ref)
}

// RemoveImage forgets a pulled image; its layers stay while leases use them.
func (m *Manager) RemoveImage(ctx context.Context, ref string) error {
	r, err := remote.ParseReference(ref)
	if err != nil {
		return err
	}
	m.mu.Lock()
	for _, l := range m.leases {
		if l.Ref == r.String() {
			m.mu.Unlock()
			return fmt.Errorf("image %s is in use by %s", ref, l.ID)
		}
	}
	m.mu.Unlock()
	p := imagePath(m.root, r.String())
	if _, err := os.Stat(p); err != nil {
		return fmt.Errorf("image %s: not pulled", ref)
	}
	return os.Remove(p)
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

// errNotPulled: a layer of a pulled image has no (intact) saved index.
var errNotPulled = errors.New("not pulled")

// acquire mounts img's layers for lease id. starting says a container (or
// union) is starting now, not being restored after a restart: its image's
// start-up profile is prefetched, or recorded when the registry has none.
func (m *Manager) acquire(ctx context.Context, id string, img *Image, union string, pid int, starting bool) (*Lease, error) {
	if m.complete != nil {
		m.complete.Busy() // a start: no background completion for a while
	}
	m.mu.Lock()
	if _, ok := m.leases[id]; ok {
		m.mu.Unlock()
		return nil, fmt.Errorf("lease %s exists", id)
	}
	m.mu.Unlock()
	// The layers are mounted at once (each mount reads its saved index and
	// starts a FUSE server); a failure releases the ones that succeeded.
	got := make([]*layer, len(img.Layers))
	errs := make([]error, len(img.Layers))
	prefetch := starting && m.opts.Profiles != ProfilesOff && img.Profile != nil
	if prefetch {
		m.starts.StartPack(remote.Repository{Registry: img.Registry, Name: img.Repo}, img.Profile, img.Layers, startup.Ready)
	}
	forEach(ctx, len(img.Layers), pullConcurrency, func(i int) {
		var p *api.Profile
		if prefetch {
			p = img.Profile
		}
		got[i], errs[i] = m.ref(ctx, img, img.Layers[i], p)
	})
	release := func() {
		for _, l := range got {
			if l != nil {
				m.unref(l)
			}
		}
	}
	err := errors.Join(errs...)
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		release()
		return nil, err
	}
	lease := &Lease{ID: id, Ref: img.Ref, Image: img, PID: pid}
	for i := len(got) - 1; i >= 0; i-- {
		lease.Lowers = append(lease.Lowers, got[i].dir)
	}
	if union != "" {
		plan, err := overlay.Plan(overlay.Spec{Lowers: lease.Lowers})
		if err == nil {
			err = plan.Do(union)
		}
		if err != nil {
			release()
			return nil, fmt.Errorf("union mount at %s: %w", union, err)
		}
		lease.Union = union
	}
	b, _ := json.MarshalIndent(lease, "", "  ")
	if err := atomicfile.Write(filepath.Join(m.root, "leases", leaseFile(id)), b); err != nil {
		if union != "" {
			overlay.Unmount(union, true)
		}
		release()
		return nil, err
	}
	m.mu.Lock()
	m.leases[id] = lease
	m.mu.Unlock()
	if starting && union == "" {
		record := img.Unprofiled && img.Profile == nil && m.opts.Profiles == ProfilesAuto
		for _, l := range got {
			// Only a start whose reads go into a profile, or come from one
			// that is not on the node yet, fetches what readahead widens.
			if record || prefetch && l.server != nil && !l.server.FS().Cached(startup.ProfileFrames(img.Profile, l.digest, l.server.FS().Index().Data)) {
				m.narrowReadahead(l)
			}
		}
		if record {
			var lazy []startup.Layer
			for _, l := range got {
				if l.server != nil {
					lazy = append(lazy, startup.Layer{Digest: l.digest, FS: l.server.FS()})
				}
			}
			target := startup.Target{Ref: img.Ref, Repo: remote.Repository{Registry: img.Registry, Name: img.Repo}, Manifest: img.Digest}
			m.starts.Record(id, target, lazy)
		}
	}
	return lease, nil
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
		if err := overlay.Unmount(lease.Union, false); err != nil {
			m.log.Warn("union busy, detaching", "dir", lease.Union, "err", err)
			overlay.Unmount(lease.Union, true)
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
		if p != nil && l.server != nil {
			fs := l.server.FS()
			fs.Prefetch(m.starts.Frames(p, l.repo, l.digest, fs.Index().Data))
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
	overlay.Unmount(mnt, true) // a stale mount from a crashed daemon
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return err
	}
	repo := remote.Repository{Registry: img.Registry, Name: img.Repo}
	srv, err := layerfs.Mount(ctx, mnt, ix, m.starts.Source(repo, ix.Data), m.cache, layerfs.Options{
		Logger: m.log, FetchTimeout: m.opts.FetchTimeout, AttemptTimeout: attemptTimeout(m.opts.FetchTimeout),
		Prefetch: m.starts.Frames(p, repo, d.Digest, ix.Data), Profiled: p != nil,
		Completer: m.complete,
	})
	if err != nil {
		return fmt.Errorf("mount layer %s: %w", d.Digest, err)
	}
	m.mu.Lock()
	l.mode, l.dir, l.server, l.usize, l.repo = ModeLazy, mnt, srv, ix.StreamSize, repo
	m.mu.Unlock()
	m.log.Info("layer mounted", "layer", d.Digest, "entries", len(ix.Entries))
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
	if l.server == nil {
		return
	}
	if l.raTimer == nil {
		old, err := l.server.SetReadahead(startupReadaheadKB)
		if err != nil {
			m.log.Debug("readahead not narrowed", "layer", l.digest, "err", err)
			return
		}
		l.raDefault = old
	} else {
		l.raTimer.Stop()
	}
	srv := l.server
	var t *time.Timer
	t = time.AfterFunc(startupWindow, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		// Not when a later start replaced this timer while it fired.
		if l.server == srv && l.raTimer == t {
			srv.SetReadahead(l.raDefault)
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
	if m.opts.Linger > 0 && l.server != nil && m.layers[l.digest] == l {
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
	}
	if l.raTimer != nil {
		l.raTimer.Stop()
		l.raTimer = nil
	}
	m.mu.Unlock()
	if l.server != nil {
		st := l.server.Stats()
		m.addFetched(l.digest, st.BytesFetched)
		m.log.Debug("layer unmounted", "layer", l.digest, "fetched_bytes", st.BytesFetched, "fetched_frames", st.FramesFetched,
			"requests", st.Requests, "page_reads", st.PageReads, "served_reads", st.ServedReads, "cache_hits", st.CacheHits)
		if err := l.server.Unmount(); err != nil {
			m.log.Warn("layer unmount", "layer", l.digest, "err", err)
			overlay.Unmount(l.dir, true)
		}
	}
}

// Close ends every lease and unmounts everything.
func (m *Manager) Close(ctx context.Context) {
	m.starts.Close(ctx)
	for _, l := range m.Leases() {
		// Keep the lease records: a restarted daemon restores them.
		m.mu.Lock()
		delete(m.leases, l.ID)
		m.mu.Unlock()
		if l.Union != "" {
			overlay.Unmount(l.Union, true)
		}
	}
	m.mu.Lock()
	layers := make([]*layer, 0, len(m.layers))
	for _, l := range m.layers {
		layers = append(layers, l)
	}
	m.layers = map[digest.Digest]*layer{}
	for _, l := range layers {
		if l.linger != nil {
			l.linger.Stop()
			l.linger = nil
		}
	}
	m.mu.Unlock()
	for _, l := range layers {
		if l.server != nil {
			m.addFetched(l.digest, l.server.Stats().BytesFetched)
			l.server.Unmount()
		}
	}
	if m.complete != nil {
		m.complete.Close()
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
	if l.server != nil && l.repo == repo && l.server.FS().Index().Data == data {
		l.server.FS().Prefetch(frames)
	}
}

// profileStored records profile p, just stored in the registry, with the
// image of t: the next container of the image on this node uses it too
// (startup.Options.Stored).
func (m *Manager) profileStored(t startup.Target, p *api.Profile) {
	path := imagePath(m.root, t.Ref)
	b, err := os.ReadFile(path)
	var img Image
	if err != nil || json.Unmarshal(b, &img) != nil || img.Digest != t.Manifest {
		return
	}
	img.Profile, img.Unprofiled = p, false
	b, _ = json.MarshalIndent(&img, "", "  ")
	atomicfile.Write(path, b)
}

func dirDigest(name string) (digest.Digest, bool) {
	alg, hex, ok := strings.Cut(name, "-")
	d := digest.Digest(alg + ":" + hex)
	return d, ok && d.Validate() == nil
}

// attemptTimeout is the per-request deadline within a fetch bound.
func attemptTimeout(fetch time.Duration) time.Duration {
	if fetch <= 0 {
		return 0
	}
	return max(fetch/3, time.Second)
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
