// Package layerfs is the FUSE file system of one expanded layer.
//
// An FS presents the tree of a layer index read-only, as overlayfs expects
// a lower layer: every entry with its mode, owner, times, link count,
// device number and xattrs; hardlinks as one inode; a whiteout as a
// character device 0/0; an opaque directory with the xattr
// trusted.overlay.opaque=y. The tree comes from the index alone: mounting
// fetches nothing.
//
// Reading a file fetches the frames of the data blob that hold the bytes
// read, with the missing frames of their miss window (Options.MissWindow),
// coalescing adjacent frames into one ranged read, prefetching ahead of
// sequential reads (Options.Readahead), and verifying every frame against
// the index before a byte of it is served. Frames are kept compressed in
// the node's cache and decompressed in a small memory cache. A source that
// keeps failing, or keeps returning bytes that fail verification, makes
// the read fail with EIO within Options.FetchTimeout. Which frames go in
// which request, in which order, and how a request is retried is package
// frames' policy; this package keeps the state that carries it out (the
// flights, the memory, the failures) and the cache.
//
// A file whose whole content is in the node's cache (or is small enough to
// be put there when it is opened) is opened with FUSE passthrough where the
// kernel allows it (Linux 6.9 and later, as root): its reads go straight to
// the cached file without entering this process.
package layerfs

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/layerindex"
)

// A Source reads the data blob of the layer, typically with ranged GETs
// from a registry (frames.Source). ReadAt returns exactly bytes [off,
// off+n) of the blob, or an error. It may be called concurrently.
type Source = frames.Source

// A PendingSource is a Source that knows which bytes are on their way to
// it already (fetched ahead, from a start-up profile): reading them costs
// no request of its own, so a prefetch reads those frames one by one, each
// as soon as it is there (Await returns when the bytes have arrived, or
// their fetch failed, or ctx is done), instead of joining them into runs.
// The read's own time bounds start once they are there.
type PendingSource interface {
	Source
	Pending(off, n int64) bool
	Await(ctx context.Context, off, n int64)
}

// A PageSource is a Source that may hold pages of the layer's
// uncompressed stream fetched ahead of the reads (a start-up pack, see
// api.Pack), verified before it hands them over. ReadPages fills dest with
// bytes [off, off+len(dest)) of the stream when it holds all of them,
// waiting for those still on their way until ctx is done; it returns false
// when it does not hold them all or their fetch failed, and the FS reads
// the frames instead. CoversPages reports, without waiting, whether it
// holds them all or they are on their way.
type PageSource interface {
	Source
	ReadPages(ctx context.Context, dest []byte, off int64) bool
	CoversPages(off, n int64) bool
}

// Options tune an FS. The zero value gives the defaults.
type Options struct {
	// Logger receives fetch failures, corrupt frames and passthrough
	// decisions. Nil discards.
	Logger *slog.Logger

	// CacheTimeout is how long the kernel may keep entries, attributes
	// and negative lookups without asking again. Default 24 hours: the
	// content never changes.
	CacheTimeout time.Duration

	// FetchTimeout bounds the time a read waits for the frames it needs,
	// retries included; then it fails with EIO. Default 30 s.
	FetchTimeout time.Duration
	// AttemptTimeout bounds one request to the source. Default 10 s.
	AttemptTimeout time.Duration
	// Attempts is the number of requests made for a range before giving
	// up. Default 3.
	Attempts int
	// Readahead is the number of uncompressed bytes of a file prefetched
	// after a sequential read (whole frames). Default 2 MiB; negative for
	// none.
	Readahead int64
	// MissWindow widens a read of frames that are not on the node: the
	// fetch takes every frame that starts in the same MissWindow-aligned
	// window of the uncompressed stream. Files next to each other in the
	// layer tend to be read together (a directory of modules, a library
	// and its neighbours), so one round trip brings what the next reads
	// need. Default 1 MiB; negative: only the frames read.
	MissWindow int64
	// PrefetchStreams is the number of requests Prefetch keeps in flight.
	// Default 6.
	PrefetchStreams int
	// PrefetchGap is the most compressed bytes of unwanted frames Prefetch
	// fetches to join two runs of wanted frames into one request. Default
	// 16 KiB (with concurrent requests, round trips overlap, and a start-up
	// prefetch is bound by the link's bandwidth); negative for none.
	PrefetchGap int64
	// MaxFetchBytes bounds the length of one coalesced request (a single
	// frame is always requested whole). Default 8 MiB.
	MaxFetchBytes int64
	// MemoryBytes bounds the decompressed frames kept in memory.
	// Default 32 MiB; negative for none.
	MemoryBytes int64

	// DisablePassthrough turns FUSE passthrough off: every read is served
	// by this process.
	DisablePassthrough bool
	// MaterializeMax is the largest file that opening puts whole into the
	// cache, to open it with passthrough. Default 1 MiB; negative: only
	// files already in the cache are opened with passthrough.
	MaterializeMax int64
	// ReadMiss, if set, is called after a read (or an open that puts a
	// file whole into the cache) that needed frames that were neither in
	// memory nor in the node's cache, once they are there, with the time
	// it waited for them: the reads that wait for the registry (or for a
	// prefetch on its way from it). Reads that fail are not reported.
	ReadMiss func(wait time.Duration)

	// Completer, shared by the FSs of a node, puts files this FS served
	// whole into the cache in the background, so that later opens use
	// passthrough (see Completer). Nil: none.
	Completer *Completer

	// ProgramMax: when a read at offset 0 shows a file is an ELF program
	// or library (a process is starting it, or the loader is mapping it),
	// the rest of the file, up to ProgramMax compressed bytes, is
	// prefetched at once over concurrent requests, instead of page fault
	// by page fault, each a round trip. Not while a start-up profile is
	// being prefetched (it knows better). Default 16 MiB; negative: never.
	ProgramMax int64

	// Prefetch lists frames to Prefetch as soon as the FS exists, before
	// it is mounted (a start-up profile).
	Prefetch []int
	// Profiled: a start-up profile is being prefetched, if not by Prefetch
	// then by the source (PageSource); see FS.Prefetch.
	Profiled bool

	// Name is the subtype of the mount: its type shows as fuse.<Name>.
	// Default strata-<hex of the layer digest>.
	Name string

	// Debug logs every FUSE request (go-fuse's debug output).
	Debug bool
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.CacheTimeout <= 0 {
		o.CacheTimeout = 24 * time.Hour
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = 30 * time.Second
	}
	if o.AttemptTimeout <= 0 {
		o.AttemptTimeout = 10 * time.Second
	}
	if o.Attempts <= 0 {
		o.Attempts = 3
	}
	if o.Readahead == 0 {
		o.Readahead = 2 << 20
	}
	if o.MissWindow == 0 {
		o.MissWindow = 1 << 20
	}
	if o.PrefetchStreams <= 0 {
		o.PrefetchStreams = 6
	}
	if o.ProgramMax == 0 {
		o.ProgramMax = 16 << 20
	}
	if o.PrefetchGap == 0 {
		o.PrefetchGap = 16 << 10
	}
	if o.MaxFetchBytes <= 0 {
		o.MaxFetchBytes = 8 << 20
	}
	if o.MemoryBytes == 0 {
		o.MemoryBytes = 32 << 20
	}
	if o.MaterializeMax == 0 {
		o.MaterializeMax = 1 << 20
	}
	return o
}

// An FS is the file system of one expanded layer. It may be mounted more
// than once; the mounts share its frames and counters.
type FS struct {
	ix    *layerindex.Index
	cache *cache.Cache
	opts  Options
	log   *slog.Logger
	fetch *fetcher
	st    counters

	// primary maps each Hardlink entry to the Reg entry it names.
	primary map[int]int
	// profiledUntil (Unix ns): until then, no sequential readahead.
	profiledUntil atomic.Int64
	// programs marks the entries already found to be programs.
	programs []atomic.Bool
	// refusal: see Refuse.
	refusal refusal
}

// New returns the file system of the layer described by ix, reading its
// data blob from src. c is the node's cache; nil keeps frames only in
// memory and disables passthrough. ix must not be modified afterwards.
func New(ix *layerindex.Index, src Source, c *cache.Cache, opts Options) (*FS, error) {
	if len(ix.Entries) == 0 || ix.Entries[0].Path != "" || ix.Entries[0].Type != layerindex.TypeDir {
		return nil, fmt.Errorf("layerfs: %w: no root directory", layerindex.ErrInvalidIndex)
	}
	opts = opts.withDefaults()
	f := &FS{ix: ix, cache: c, opts: opts, log: opts.Logger, primary: make(map[int]int)}
	f.fetch = newFetcher(ix, src, c, &f.opts, &f.st)
	f.programs = make([]atomic.Bool, len(ix.Entries))
	for i := range ix.Entries {
		e := &ix.Entries[i]
		if e.Type != layerindex.TypeHardlink {
			continue
		}
		j, ok := ix.Lookup(e.Linkname)
		if !ok || ix.Entries[j].Type != layerindex.TypeReg {
			return nil, fmt.Errorf("layerfs: %w: hardlink %q: target %q is not a regular file", layerindex.ErrInvalidIndex, e.Path, e.Linkname)
		}
		f.primary[i] = j
	}
	if len(f.opts.Prefetch) > 0 || f.opts.Profiled {
		f.Prefetch(f.opts.Prefetch)
	}
	return f, nil
}

// A Server serves one mount of an FS.
type Server struct {
	fs     *FS
	dir    string
	server *fuse.Server
	ownFS  bool   // made by Mount: Unmount closes the FS
	bdi    string // the mount's read_ahead_kb in sysfs

	mu        sync.Mutex
	unmounted bool // no SetReadahead: the device number may be reused
}

// Mount is New followed by FS.Mount.
func Mount(ctx context.Context, dir string, ix *layerindex.Index, src Source, c *cache.Cache, opts Options) (*Server, error) {
	f, err := New(ix, src, c, opts)
	if err != nil {
		return nil, err
	}
	s, err := f.Mount(ctx, dir)
	if err != nil {
		f.Close()
		return nil, err
	}
	s.ownFS = true
	return s, nil
}

// Close stops the FS's fetches in the background (prefetches, readahead)
// and waits for them to end. Reads after Close fail.
func (f *FS) Close() { f.fetch.close() }

// Mount mounts the file system on dir, read-only, and returns once the
// kernel has it. Unmount it with Server.Unmount.
func (f *FS) Mount(ctx context.Context, dir string) (*Server, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ms := &mountState{}
	root := &node{fs: f, mnt: ms, i: 0}
	f.addRoot(root)
	timeout := f.opts.CacheTimeout
	golog := slog.NewLogLogger(f.log.Handler(), slog.LevelDebug)
	if !f.opts.Debug {
		golog = log.New(io.Discard, "", 0)
	}
	name := f.opts.Name
	if name == "" {
		name = defaultName(f.ix)
	}
	server, err := fs.Mount(dir, root, &fs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		Logger:          golog,
		MountOptions: fuse.MountOptions{
			AllowOther:           true,
			FsName:               "strata",
			Name:                 name,
			Options:              []string{"ro", "default_permissions"},
			DirectMount:          true,
			DirectMountFlags:     syscall.MS_RDONLY | syscall.MS_NOSUID | syscall.MS_NODEV,
			EnableSymlinkCaching: true,
			MaxWrite:             1 << 20,
			Debug:                f.opts.Debug,
			Logger:               golog,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("mount layer %s on %s: %w", f.ix.Layer, dir, err)
	}
	ms.server.Store(server)
	f.log.Debug("layerfs: mounted", "layer", f.ix.Layer, "dir", dir,
		"kernel_passthrough", server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH != 0)
	s := &Server{fs: f, dir: dir, server: server}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err == nil {
		s.bdi = fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	}
	return s, nil
}

// SetReadahead sets the kernel's readahead on the mount to kb KiB (the
// read_ahead_kb of its backing device) and returns the value before. Files
// opened from then on use it, for their reads and for the window the kernel
// reads around a page fault of a mapped file (an open file keeps the value
// it was opened with). It fails once the server is unmounted.
func (s *Server) SetReadahead(kb int) (old int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unmounted || s.bdi == "" {
		return 0, fmt.Errorf("readahead of %s: not mounted", s.dir)
	}
	b, err := os.ReadFile(s.bdi)
	if err != nil {
		return 0, fmt.Errorf("readahead of %s: %w", s.dir, err)
	}
	if old, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
		return 0, fmt.Errorf("readahead of %s: %s: %q", s.dir, s.bdi, b)
	}
	if err := os.WriteFile(s.bdi, []byte(strconv.Itoa(kb)), 0); err != nil {
		return 0, fmt.Errorf("readahead of %s: %w", s.dir, err)
	}
	return old, nil
}

// defaultName names the layer in the file system type: fuse.strata-<hex>.
func defaultName(ix *layerindex.Index) string {
	if ix.Layer.Validate() == nil {
		return "strata-" + ix.Layer.Encoded()
	}
	return "strata"
}

// Dir returns the mount point.
func (s *Server) Dir() string { return s.dir }

// FS returns the file system the server serves.
func (s *Server) FS() *FS { return s.fs }

// Stats returns the counters of the file system, see FS.Stats.
func (s *Server) Stats() Stats { return s.fs.Stats() }

// Unmount unmounts the file system and waits until its server stopped. It
// fails (EBUSY) while files of the mount are in use.
func (s *Server) Unmount() error {
	s.mu.Lock()
	s.unmounted = true
	s.mu.Unlock()
	if err := s.server.Unmount(); err != nil {
		s.mu.Lock()
		s.unmounted = false
		s.mu.Unlock()
		return fmt.Errorf("unmount %s: %w", s.dir, err)
	}
	if s.ownFS {
		s.fs.Close()
	}
	return nil
}

// Wait blocks until the file system is unmounted, by Unmount or by
// someone else.
func (s *Server) Wait() { s.server.Wait() }

// mountState is what the nodes of one mount share.
type mountState struct {
	server atomic.Pointer[fuse.Server]

	// passthrough: 0 not yet known, 1 works, -1 refused by the kernel.
	passthrough atomic.Int32
}

// canPassthrough reports whether the kernel accepts backing files, trying
// once per mount with the descriptor fd.
func (m *mountState) canPassthrough(log *slog.Logger, fd uintptr) bool {
	switch m.passthrough.Load() {
	case 1:
		return true
	case -1:
		return false
	}
	srv := m.server.Load()
	if srv == nil {
		return false // still mounting
	}
	ok := false
	if srv.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		log.Info("layerfs: the kernel does not offer FUSE passthrough; serving reads")
	} else if id, errno := srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(fd)}); errno != 0 {
		log.Info("layerfs: the kernel refuses FUSE passthrough backing files; serving reads", "err", errno)
	} else {
		srv.UnregisterBackingFd(id)
		ok = true
	}
	if ok {
		m.passthrough.CompareAndSwap(0, 1)
	} else {
		m.passthrough.CompareAndSwap(0, -1)
	}
	return m.passthrough.Load() == 1
}

// Stats count what an FS did since New.
type Stats struct {
	BytesFetched  int64 // compressed bytes read from the source
	FramesFetched int64 // frames read from the source and verified
	Requests      int64 // successful requests to the source
	SourceErrors  int64 // failed requests: errors, timeouts, short reads
	CorruptFrames int64 // frames from the source that failed verification
	CacheHits     int64 // frames found in the node's cache
	MemoryHits    int64 // frames found decompressed in memory

	Materialized     int64 // files put whole into the cache on open
	PassthroughOpens int64 // opens whose reads the kernel serves from the cache
	ServedOpens      int64 // opens whose reads this process serves
	ServedReads      int64 // read requests this process answered
	ServedBytes      int64 // bytes those requests returned
	PageReads        int64 // reads (and files put into the cache) served from a PageSource
	Programs         int64 // ELF files prefetched whole when first read
	DirListings      int64 // directory listings served (the kernel keeps them)
	Flushes          int64 // FLUSH requests (the first is told ENOSYS: no more come)
	StreamedFrames   int64 // frames fetched ahead of a walk of the layer in its order
}

type counters struct {
	fetchedBytes, fetchedFrames, requests, sourceErrors, corruptFrames atomic.Int64
	cacheHits, memoryHits                                              atomic.Int64
	materialized, passthroughOpens, servedOpens                        atomic.Int64
	servedReads, servedBytes, pageReads                                atomic.Int64
	programs                                                           atomic.Int64
	dirListings, flushes                                               atomic.Int64
	streamed                                                           atomic.Int64
}

// Stats returns the counters.
func (f *FS) Stats() Stats {
	s := &f.st
	return Stats{
		BytesFetched:     s.fetchedBytes.Load(),
		FramesFetched:    s.fetchedFrames.Load(),
		Requests:         s.requests.Load(),
		SourceErrors:     s.sourceErrors.Load(),
		CorruptFrames:    s.corruptFrames.Load(),
		CacheHits:        s.cacheHits.Load(),
		MemoryHits:       s.memoryHits.Load(),
		Materialized:     s.materialized.Load(),
		PassthroughOpens: s.passthroughOpens.Load(),
		ServedOpens:      s.servedOpens.Load(),
		ServedReads:      s.servedReads.Load(),
		ServedBytes:      s.servedBytes.Load(),
		PageReads:        s.pageReads.Load(),
		Programs:         s.programs.Load(),
		DirListings:      s.dirListings.Load(),
		Flushes:          s.flushes.Load(),
		StreamedFrames:   s.streamed.Load(),
	}
}

// Prefetch starts fetching the frames ks of the data blob (indexes into
// the index's frame table, first wanted first; others are ignored) that
// are neither in memory nor in the cache, with Options.PrefetchStreams
// concurrent requests, and returns at once. Reads of those frames wait for
// these fetches instead of making their own.
//
// A prefetch is taken to be a start-up profile: for profileWindow after
// it, sequential reads do not prefetch further (the profile already lists
// what the start reads; more would only compete with it for the link).
func (f *FS) Prefetch(ks []int) {
	f.profiledUntil.Store(time.Now().Add(profileWindow).UnixNano())
	f.fetch.prefetchList(ks)
}

// program notes that entry i, whose first bytes are head, was read from
// offset 0, and prefetches the whole file if it is an ELF file (see
// Options.ProgramMax).
func (f *FS) program(i int, head []byte) {
	if f.opts.ProgramMax <= 0 || len(head) < 4 || string(head[:4]) != "\x7fELF" ||
		time.Now().UnixNano() <= f.profiledUntil.Load() || f.programs[i].Swap(true) {
		return
	}
	e := &f.ix.Entries[i]
	first, last := f.ix.FramesFor(e.Offset, e.Size)
	var size int64
	ks := make([]int, 0, last-first+1)
	for k := first; k <= last; k++ {
		size += f.ix.Frames[k].CSize
		ks = append(ks, k)
	}
	if size > f.opts.ProgramMax || len(ks) < 2 {
		return
	}
	f.st.programs.Add(1)
	f.fetch.prefetchList(ks)
}

// profileWindow is how long after a Prefetch readahead stays off.
const profileWindow = 10 * time.Second

// StartRecording starts listing the frames that reads need (from the
// source, the cache or memory alike), and the pages of the uncompressed
// stream they read; StopRecording ends the recording and returns them in
// the order first needed, each with a sequence number that orders first
// reads across all the FSs of the process (so the recordings of several
// layers merge into one order). Prefetches are not reads; putting a file
// whole into the cache is a read of all of it.
// A recording holds back the Options.Completer: a file completed into the
// cache would be read with passthrough, unseen.
func (f *FS) StartRecording() { f.fetch.startRecording() }

// StopRecording: see StartRecording and Recording.
func (f *FS) StopRecording() Recording { return f.fetch.stopRecording() }

// Cached reports whether the frames ks are all on the node: in memory or
// in the cache.
func (f *FS) Cached(ks []int) bool {
	f.fetch.mu.Lock()
	defer f.fetch.mu.Unlock()
	for _, k := range ks {
		if k >= 0 && k < len(f.ix.Frames) && !f.fetch.mem.has(k) && !f.fetch.cached(k) {
			return false
		}
	}
	return true
}

// Index returns the index the FS presents.
func (f *FS) Index() *layerindex.Index { return f.ix }
