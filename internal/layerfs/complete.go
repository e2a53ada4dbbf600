package layerfs

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/cache"
	"github.com/strata-oci/strata/internal/frames"
	"github.com/strata-oci/strata/layerindex"
)

// A Completer puts files that were read through this process whole into
// the node's cache, in the background, so that later opens of them use
// passthrough: the kernel reads the cache file directly, at local speed.
//
// A file larger than Options.MaterializeMax, or one whose frames were not
// on the node when it was opened, is served from its frames, read by read,
// each through this process. When its last served handle closes, the FSs
// that share a Completer hand the file to it (Options.Completer). It waits
// until the node is quiet — no read served and no file opened by any of
// those FSs for its quiet time, and none of them recording a start-up
// profile (whose pages passthrough would hide) — then fetches the frames
// the node does not have, one batch at a time and only while it stays
// quiet, and streams the file into the cache, which checks its digest
// before it becomes visible. One file at a time. A file is completed from
// the index, the source and the cache alone, so unmounting its layer does
// not stop it.
type Completer struct {
	log     *slog.Logger
	quiet   time.Duration
	max     int64
	onFetch func(layer digest.Digest, n int64)

	busy      atomic.Int64 // Unix ns of the last activity
	recording atomic.Int64 // FSs recording a start-up profile

	mu       sync.Mutex
	queue    []completion
	queued   map[digest.Digest]bool      // queued or in progress
	failedAt map[digest.Digest]time.Time // not tried again for retryAfter
	wake     chan struct{}
	changed  chan struct{} // closed and replaced when the queue empties

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	files, bytes, fetched, failed atomic.Int64
	heldBack, declined            atomic.Int64
}

type completion struct {
	ix    *layerindex.Index
	src   Source
	cache *cache.Cache
	opts  Options
	e     *layerindex.Entry
}

// CompleterOptions configure a Completer.
type CompleterOptions struct {
	// Logger: nil discards.
	Logger *slog.Logger
	// Quiet is how long the node must have been idle before a file is
	// completed, and between its batches. Default 1 s.
	Quiet time.Duration
	// MaxFile is the largest file completed. Default 256 MiB.
	MaxFile int64
	// Fetched, if set, is told the compressed bytes each completion
	// fetched, with the layer they are of.
	Fetched func(layer digest.Digest, n int64)
}

// completeBatch is the most uncompressed bytes a completion fetches
// before it checks again that the node is quiet (frames.Steps).
const completeBatch = 4 << 20

// retryAfter is how long a file whose completion failed is not tried
// again: a broken frame or a failing registry must not make every close
// of the file fetch it again.
const retryAfter = 10 * time.Minute

var (
	// errHeldBack: a recording started while the file was being
	// completed; it is put back in the queue, not into the cache.
	errHeldBack = errors.New("a start-up profile is being recorded")
	// errPresent: the file was in the cache already.
	errPresent = errors.New("in the cache already")
)

// NewCompleter starts a Completer; Close stops it.
func NewCompleter(opts CompleterOptions) *Completer {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Quiet <= 0 {
		opts.Quiet = time.Second
	}
	if opts.MaxFile <= 0 {
		opts.MaxFile = 256 << 20
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Completer{
		log: opts.Logger, quiet: opts.Quiet, max: opts.MaxFile, onFetch: opts.Fetched,
		queued: make(map[digest.Digest]bool), failedAt: make(map[digest.Digest]time.Time), wake: make(chan struct{}, 1), changed: make(chan struct{}),
		ctx: ctx, cancel: cancel, done: make(chan struct{}),
	}
	c.Busy()
	go c.run()
	return c
}

// Close stops the Completer: a file being completed is abandoned (nothing
// of it is visible in the cache) and the queue is dropped.
func (c *Completer) Close() {
	c.cancel()
	<-c.done
}

// Busy notes activity: completions wait until the node has been quiet
// for the quiet time since the last call.
func (c *Completer) Busy() { c.busy.Store(time.Now().UnixNano()) }

// CompleterStats count what a Completer did.
type CompleterStats struct {
	Pending int   `json:"pending"` // files queued or being completed
	Files   int64 `json:"files"`   // files completed into the cache
	Bytes   int64 `json:"bytes"`   // their size
	Fetched int64 `json:"fetched"` // compressed bytes fetched from sources for them
	Failed  int64 `json:"failed"`  // completions that failed
	// HeldBack counts the times a quiet node was not used because a
	// start-up profile was being recorded; Declined the files not queued
	// because their completion failed less than 10 minutes before.
	HeldBack int64 `json:"heldBack"`
	Declined int64 `json:"declined"`
}

// Stats returns the counters.
func (c *Completer) Stats() CompleterStats {
	c.mu.Lock()
	n := len(c.queued)
	c.mu.Unlock()
	return CompleterStats{Pending: n, Files: c.files.Load(), Bytes: c.bytes.Load(), Fetched: c.fetched.Load(), Failed: c.failed.Load(),
		HeldBack: c.heldBack.Load(), Declined: c.declined.Load()}
}

// Idle returns a channel closed once nothing is queued or in progress.
func (c *Completer) Idle() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.queued) == 0 {
		return closedChan
	}
	return c.changed
}

var closedChan = func() chan struct{} { ch := make(chan struct{}); close(ch); return ch }()

// add queues the completion of file e of f, unless it is queued already,
// too large, or in the cache.
func (c *Completer) add(f *FS, e *layerindex.Entry) {
	if e.Size == 0 || e.Size > c.max || f.cache.Contains(e.Digest) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.queued[e.Digest] || c.ctx.Err() != nil {
		return
	}
	if at, ok := c.failedAt[e.Digest]; ok {
		if time.Since(at) < retryAfter {
			c.declined.Add(1)
			return
		}
		delete(c.failedAt, e.Digest)
	}
	c.queued[e.Digest] = true
	c.queue = append(c.queue, completion{ix: f.ix, src: f.src(), cache: f.cache, opts: f.opts, e: e})
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *Completer) run() {
	defer func() {
		c.mu.Lock()
		c.queue, c.queued = nil, map[digest.Digest]bool{}
		close(c.changed)
		c.changed = closedChan
		c.mu.Unlock()
		close(c.done)
	}()
	for {
		c.mu.Lock()
		if len(c.queue) == 0 {
			c.mu.Unlock()
			select {
			case <-c.wake:
				continue
			case <-c.ctx.Done():
				return
			}
		}
		job := c.queue[0]
		c.queue = c.queue[1:]
		c.mu.Unlock()

		start := time.Now()
		fetched, err := c.complete(c.ctx, job)
		c.fetched.Add(fetched)
		if fetched > 0 && c.onFetch != nil {
			c.onFetch(job.ix.Layer, fetched)
		}
		requeue := false
		switch {
		case err == nil:
			c.files.Add(1)
			c.bytes.Add(job.e.Size)
			c.log.Debug("layerfs: file completed into the cache", "path", job.e.Path, "size", job.e.Size,
				"fetched", fetched, "took", time.Since(start).Round(time.Millisecond))
		case c.ctx.Err() != nil, errors.Is(err, errPresent):
		case errors.Is(err, errHeldBack):
			requeue = true
		default:
			c.failed.Add(1)
			c.log.Warn("layerfs: completing a file into the cache failed", "path", job.e.Path, "err", err)
		}

		c.mu.Lock()
		switch {
		case requeue:
			c.queue = append(c.queue, job)
		case err != nil && !errors.Is(err, errPresent) && c.ctx.Err() == nil:
			c.failedAt[job.e.Digest] = time.Now()
			fallthrough
		default:
			delete(c.queued, job.e.Digest)
		}
		if len(c.queued) == 0 {
			close(c.changed)
			c.changed = make(chan struct{})
		}
		c.mu.Unlock()
		if c.ctx.Err() != nil {
			return
		}
	}
}

// waitQuiet returns once the node has been quiet for the quiet time.
func (c *Completer) waitQuiet(ctx context.Context) error {
	for {
		idle := time.Since(time.Unix(0, c.busy.Load()))
		if idle >= c.quiet {
			if c.recording.Load() == 0 {
				return nil
			}
			c.heldBack.Add(1)
		}
		t := time.NewTimer(max(c.quiet-idle, c.quiet/4))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}

// complete streams file job.e into the cache from its frames, fetching
// those the node does not have, and returns the compressed bytes fetched.
func (c *Completer) complete(ctx context.Context, job completion) (int64, error) {
	ix, e := job.ix, job.e
	if err := c.waitQuiet(ctx); err != nil {
		return 0, err
	}
	if job.cache.Contains(e.Digest) {
		return 0, errPresent
	}
	// A fetcher of its own: no miss windows, little memory, and the
	// layer's FS may be gone.
	opts := job.opts
	opts.MissWindow = -1
	opts.MemoryBytes = 2 * completeBatch
	opts.Completer = nil
	opts.ReadMiss = nil // not a read
	var st counters
	fetch := newFetcher(ix, job.src, job.cache, &opts, &st)

	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	streamed := make(chan struct{})
	go func() {
		defer close(streamed)
		pw.CloseWithError(c.stream(ctx, fetch, e, pw))
	}()
	err := job.cache.PutFile(ctx, e.Digest, e.Size, pr)
	pr.CloseWithError(errors.Join(err, io.ErrClosedPipe))
	cancel()
	<-streamed
	fetch.close()
	return st.fetchedBytes.Load(), err
}

// stream writes the content of e to w from its frames, a batch at a time,
// each once the node is quiet.
func (c *Completer) stream(ctx context.Context, fetch *fetcher, e *layerindex.Entry, w io.Writer) error {
	ix := fetch.ix
	first, last := ix.FramesFor(e.Offset, e.Size)
	for _, step := range frames.Steps(ix.Frames, first, last, completeBatch) {
		if err := c.waitQuiet(ctx); err != nil {
			return err
		}
		got, err := fetch.frames(ctx, step[0], step[1])
		if err != nil {
			return err
		}
		for i, data := range got {
			fr := &ix.Frames[step[0]+i]
			lo := max(e.Offset-fr.UOffset, 0)
			hi := min(e.Offset+e.Size-fr.UOffset, fr.USize)
			if _, err := w.Write(data[lo:hi]); err != nil {
				return err
			}
		}
	}
	if c.recording.Load() > 0 {
		// A start began recording meanwhile: it must see this file's
		// reads, so the file must not be committed now.
		return errHeldBack
	}
	return nil
}
