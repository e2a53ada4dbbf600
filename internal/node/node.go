// Package node is the node's layer mount manager: it resolves images, asks
// the registry for layer mounts, mounts each expanded layer once (FUSE,
// shared, refcounted, lingering a while after its last user), falls back to
// pulling and unpacking layers from registries without layer mounts, and
// holds the leases that keep layers mounted while containers and union
// mounts use them, restoring them after a crash.
//
// One file per concept: images (image.go), pulls (pull.go), the saved
// indexes (index.go), leases and restore (lease.go), shared layer mounts
// (layer.go), and the Mounter seam through which every mount is made
// (mount.go). Start-up profiles are package startup's; the daemon that
// serves a Manager to the CLI is package nodeapi's.
//
// State under the node root:
//
//	<root>/
//	  cache/                          the verified content cache (package cache)
//	  layers/<alg>-<hex>/index        a layer's index blob, verified against mount.json
//	  layers/<alg>-<hex>/mount.json   its mount descriptor, bound to the layer digest and diff ID
//	  layers/<alg>-<hex>/fetched      bytes fetched by earlier mounts (strata df)
//	  layers/<alg>-<hex>/mnt/         the layer's FUSE mount point (while mounted)
//	  layers/<alg>-<hex>/fs/          a fallback layer's unpacked tree (unpacked: done)
//	  images/<hash of ref>.json       a pulled image: reference, digest, config, layers, mode
//	  leases/<hash of id>.json        what holds layers mounted: a container or a union mount
//	  strata.sock, daemon.pid         the node daemon's socket and PID (package nodeapi)
//	  daemon.log                      the output of a daemon a client started
//	  daemon.lock                     held by the daemon for its life: one per root
//	  daemon.start                    held by a client starting the daemon
package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/startup"
	"github.com/strata-oci/strata/layerindex"
)

// Modes of a pulled layer.
const (
	ModeLazy     = "lazy"     // layer mount from the registry's expansion, FUSE
	ModeUnpacked = "unpacked" // fallback: downloaded and unpacked
)

// Where the expansion of a lazy layer comes from (Image.Source).
const (
	// SourceMountAPI: the registry's layer-mount API (/v2/<name>/_strata/…).
	SourceMountAPI = "layer-mount API"
	// SourceReferrers: an expansion artifact referring to the image
	// manifest (`strata expand`), from any OCI registry.
	SourceReferrers = "expansion referrer"
)

// Options configure a Manager.
type Options struct {
	Root      string
	CacheSize int64
	Logger    *slog.Logger
	// Mounter performs the mounts (nil: KernelMounter).
	Mounter Mounter
	// Remote is the registry client. Its Hosts resolver is the node's:
	// a registry a request reaches over plain HTTP is marked there
	// (AllowPlainHTTP), and so is one an image was pulled from that way
	// when a lease on the image is taken or restored.
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
	// VerifyLayers is whether the node checks that the expansion of each
	// lazy layer it mounts is the layer's (see verify.go):
	// VerifyBackground (the default) fetches the layer blob once the
	// node is quiet, expands it again and compares; a layer whose
	// expansion differs is refused (reads fail with EIO) and pulled
	// whole when next used. VerifyOff trusts the expansion's claims.
	VerifyLayers string
	// VerifyQuiet is how long the node must have been idle (no start, no
	// read of a lazy layer, no background completion or download) before
	// a verification begins or goes on (default 10 s).
	VerifyQuiet time.Duration
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
	mounter  Mounter
	// fetchedMu serializes addFetched.
	fetchedMu sync.Mutex

	// gcMu: pulls hold it shared, collections (gc.go) exclusively.
	gcMu sync.RWMutex

	mu   sync.Mutex
	info map[string]bool // registry → offers layer mounts
	// expansions: expansion referrers found by MountLayer, by repo@manifest
	expansions map[string]cachedExpansion
	// mountProfiles: start-up profiles found by MountLayer, by repo@manifest
	mountProfiles map[string]cachedProfile
	layers        map[digest.Digest]*layer
	leases        map[string]*Lease
	// downloads in progress (fallback pulls), for progress bars
	downloads map[digest.Digest]*Download
	// decoded indexes saved by a pull, for the mount that follows
	decoded map[digest.Digest]*layerindex.Index

	// starts fetches what start-up profiles list and records them.
	starts *startup.Profiles
	// metrics: see metrics.go.
	metrics *metrics
	// verify verifies lazy layers in the background (verify.go); nil
	// when Options.VerifyLayers is VerifyOff.
	verify *verifier
	// detached: refused lazy layers still mounted for their users, no
	// longer in layers.
	detached map[*layer]bool
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
	switch opts.VerifyLayers {
	case "":
		opts.VerifyLayers = VerifyBackground
	case VerifyBackground, VerifyOff:
	default:
		return nil, fmt.Errorf("node: layer verification %q is not %s or %s", opts.VerifyLayers, VerifyBackground, VerifyOff)
	}
	for _, d := range []string{"layers", "images", "leases", "cache"} {
		if err := os.MkdirAll(filepath.Join(opts.Root, d), 0o755); err != nil {
			return nil, fmt.Errorf("node root: %w", err)
		}
	}
	// Images' setuid files and device nodes, and containers' writable
	// layers, sit below the root: no other user may traverse it (the class
	// of CVE-2021-41091; roots made before are fixed too). Containers are
	// unaffected: runc enters their root file systems as root.
	if err := os.Chmod(opts.Root, 0o700); err != nil {
		return nil, fmt.Errorf("node root: %w", err)
	}
	c, err := cache.Open(filepath.Join(opts.Root, "cache"), cache.Options{MaxBytes: opts.CacheSize, Logger: log})
	if err != nil {
		return nil, err
	}
	m := &Manager{
		opts: opts, root: opts.Root, log: log, cache: c, mounter: opts.Mounter,
		info: map[string]bool{}, expansions: map[string]cachedExpansion{}, mountProfiles: map[string]cachedProfile{},
		layers: map[digest.Digest]*layer{}, leases: map[string]*Lease{},
		downloads: map[digest.Digest]*Download{},
		decoded:   map[digest.Digest]*layerindex.Index{},
		metrics:   newMetrics(),
		detached:  map[*layer]bool{},
	}
	if m.mounter == nil {
		m.mounter = KernelMounter{}
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
		Prefetch: m.prefetchMounted, Stored: m.profileStored, PushReferrer: m.pushProfile,
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
	if opts.VerifyLayers == VerifyBackground {
		m.verify = newVerifier(m, opts.VerifyQuiet)
	}
	m.cleanStale()
	m.reserveUnpacked()
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
			m.mounter.Unmount(l.Union, true)
		}
	}
	mnts, _ := filepath.Glob(filepath.Join(m.root, "layers", "*", "mnt"))
	for _, p := range mnts {
		m.mounter.Unmount(p, true)
	}
}

func layerDir(root string, d digest.Digest) string {
	return filepath.Join(root, "layers", string(d.Algorithm())+"-"+d.Encoded())
}

func imagePath(root, ref string) string {
	h := sha256.Sum256([]byte(ref))
	return filepath.Join(root, "images", hex.EncodeToString(h[:12])+".json")
}

// Close ends every lease and unmounts everything.
func (m *Manager) Close(ctx context.Context) {
	if m.verify != nil {
		m.verify.close()
	}
	m.starts.Close(ctx)
	for _, l := range m.Leases() {
		// Keep the lease records: a restarted daemon restores them.
		m.mu.Lock()
		delete(m.leases, l.ID)
		m.mu.Unlock()
		if l.Union != "" {
			m.mounter.Unmount(l.Union, true)
		}
	}
	m.mu.Lock()
	layers := make([]*layer, 0, len(m.layers))
	for _, l := range m.layers {
		layers = append(layers, l)
	}
	m.layers = map[digest.Digest]*layer{}
	for l := range m.detached {
		layers = append(layers, l)
	}
	m.detached = map[*layer]bool{}
	for _, l := range layers {
		m.retire(l)
		if l.linger != nil {
			l.linger.Stop()
			l.linger = nil
		}
	}
	m.mu.Unlock()
	for _, l := range layers {
		if l.mnt != nil {
			m.addFetched(l.digest, l.fs.Stats().BytesFetched)
			m.unmountLayer(l)
		}
	}
	if m.complete != nil {
		m.complete.Close()
	}
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
