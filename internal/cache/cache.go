// Package cache is the node-local content cache: a directory of items
// addressed by their sha256 digest, verified when they are loaded and
// bounded in size by least-recently-used eviction.
//
// It holds two kinds of item:
//
//   - frames: the compressed bytes of one frame of an expanded layer's data
//     blob, keyed by the frame's digest from the layer index;
//   - files: the uncompressed content of one regular file, keyed by the
//     file's content digest, so identical content is stored once whatever
//     layers and images hold it. An open file is the backing file of FUSE
//     passthrough.
//
// On disk, under the directory given to Open:
//
//	<dir>/
//	  frames/sha256/<hex[0:2]>/<hex>   compressed frame
//	  files/sha256/<hex[0:2]>/<hex>    whole uncompressed file
//	  tmp/                             writes in progress; emptied by Open
//
// Every write goes to a temporary file in tmp/, is verified against its
// digest and renamed into place, so while the process runs an item is
// either complete and correct or absent. Writes are not synced: a crash of
// the machine can leave an item torn, but every item is verified before it
// is used after a restart (below), so a torn item is a miss, never wrong
// content, and a node does not wait for the disk on every frame it fetches.
// The sizes of the items are kept in memory and rebuilt by scanning the
// directory on Open.
//
// Verification: the bytes of a frame are hashed on every load. A file is
// hashed the first time it is opened after Open (or not at all when this
// process wrote it): hashing a large file on every open would cost more than
// the read it serves. An item whose bytes do not match its digest is
// deleted and reported as a miss (ErrNotFound), never returned.
//
// Eviction: when an insertion would take the cache above Options.MaxBytes,
// the least recently used items that no open File pins are deleted first.
// Frames are never pinned: Frame returns a copy of their bytes.
package cache

import (
	"bytes"
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

var (
	// ErrNotFound is returned when the cache does not hold an item, or
	// held one that failed verification (and has now been deleted).
	ErrNotFound = errors.New("not in cache")
	// ErrDigestMismatch is returned when bytes offered to the cache do not
	// match the digest they are offered under; nothing is stored.
	ErrDigestMismatch = errors.New("content does not match its digest")
	// ErrTooLarge is returned when an item is larger than the whole cache.
	ErrTooLarge = errors.New("item larger than the cache")
	// ErrFull is returned when an item does not fit even after evicting
	// everything that no open file pins.
	ErrFull = errors.New("cache full of pinned items")
)

// kind is the kind of an item; it names its directory.
type kind uint8

const (
	kindFrame kind = iota
	kindFile
	numKinds
)

var kindDirs = [numKinds]string{"frames", "files"}

// Options configure a Cache.
type Options struct {
	// MaxBytes bounds the total size of the items. Zero or negative means
	// no bound.
	MaxBytes int64
	// Logger receives evictions, deleted corrupt items and scan problems.
	// Nil discards.
	Logger *slog.Logger
}

// A Cache is a directory of verified, content-addressed items. It is safe
// for concurrent use by multiple goroutines. Only one Cache may use a
// directory at a time.
type Cache struct {
	dir string
	max int64
	log *slog.Logger

	mu sync.Mutex
	// reserved: bytes of the budget used outside the cache (SetReserved).
	reserved int64
	items    map[key]*item
	lru      *list.List // of *item; front is the most recently used
	// lastStamp is the modification time given to the newest item.
	lastStamp time.Time
	bytes     [numKinds]int64
	count     [numKinds]int
	pins      int // items with pins > 0

	hits, misses, evictions, corrupt atomic.Int64
}

type key struct {
	kind kind
	hex  string // lowercase sha256 hex
}

type item struct {
	key      key
	size     int64
	pins     int
	verified bool
	elem     *list.Element // nil once removed from the cache
}

// Open opens the cache in dir, creating it if needed. It removes what
// interrupted writes left behind, and rebuilds the list of items and their
// sizes from the directory, oldest modification time least recently used.
// Entries that are not items of the cache are deleted. When the items
// found exceed MaxBytes, the oldest are evicted.
func Open(dir string, opts Options) (*Cache, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cache{
		dir:   dir,
		max:   opts.MaxBytes,
		log:   log,
		items: make(map[key]*item),
		lru:   list.New(),
	}
	if err := os.RemoveAll(c.tmpDir()); err != nil {
		return nil, fmt.Errorf("open cache %s: %w", dir, err)
	}
	if err := os.MkdirAll(c.tmpDir(), 0o700); err != nil {
		return nil, fmt.Errorf("open cache %s: %w", dir, err)
	}
	type found struct {
		it    *item
		mtime time.Time
	}
	var all []found
	for k := range numKinds {
		root := filepath.Join(dir, kindDirs[k], "sha256")
		if err := os.MkdirAll(root, 0o700); err != nil {
			return nil, fmt.Errorf("open cache %s: %w", dir, err)
		}
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if p == root {
				return nil
			}
			rel, _ := filepath.Rel(root, p)
			if d.IsDir() {
				if len(rel) == 2 && isHex(rel) {
					return nil
				}
				c.log.Warn("cache: removing stray directory", "path", p)
				if err := os.RemoveAll(p); err != nil {
					return err
				}
				return filepath.SkipDir
			}
			name := d.Name()
			fi, err := d.Info()
			if err != nil {
				return err
			}
			if !d.Type().IsRegular() || len(name) != 2*sha256.Size || !isHex(name) || rel != filepath.Join(name[:2], name) {
				c.log.Warn("cache: removing stray file", "path", p)
				return os.Remove(p)
			}
			all = append(all, found{&item{key: key{k, name}, size: fi.Size()}, fi.ModTime()})
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("open cache %s: scan: %w", dir, err)
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	for _, f := range all {
		c.insert(f.it)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(all) > 0 {
		c.lastStamp = all[len(all)-1].mtime
	}
	if c.max > 0 {
		if err := c.makeRoom(0); err != nil {
			return nil, fmt.Errorf("open cache %s: %w", dir, err)
		}
	}
	return c, nil
}

// Dir returns the directory of the cache.
func (c *Cache) Dir() string { return c.dir }

func (c *Cache) tmpDir() string { return filepath.Join(c.dir, "tmp") }

func (c *Cache) path(k key) string {
	return filepath.Join(c.dir, kindDirs[k.kind], "sha256", k.hex[:2], k.hex)
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// keyOf checks that d is a sha256 digest.
func keyOf(k kind, d digest.Digest) (key, error) {
	// Checked by hand: digest.Validate's regular expression was 3% of the
	// daemon's CPU in a warm tree walk (a key per open).
	alg, hex, ok := strings.Cut(string(d), ":")
	if !ok || alg != string(digest.SHA256) {
		return key{}, fmt.Errorf("digest %q: not a sha256 digest", d)
	}
	if len(hex) != 64 || strings.IndexFunc(hex, func(r rune) bool { return (r < '0' || r > '9') && (r < 'a' || r > 'f') }) >= 0 {
		return key{}, fmt.Errorf("digest %q: %w", d, digest.ErrDigestInvalidFormat)
	}
	return key{k, hex}, nil
}

// insert adds it as the most recently used item. The caller must not hold mu.
func (c *Cache) insert(it *item) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.insertLocked(it)
}

func (c *Cache) insertLocked(it *item) {
	it.elem = c.lru.PushFront(it)
	c.items[it.key] = it
	c.bytes[it.key.kind] += it.size
	c.count[it.key.kind]++
}

// removeLocked forgets it and deletes its file.
func (c *Cache) removeLocked(it *item) {
	if it.elem == nil {
		return
	}
	c.lru.Remove(it.elem)
	it.elem = nil
	delete(c.items, it.key)
	c.bytes[it.key.kind] -= it.size
	c.count[it.key.kind]--
	if it.pins > 0 {
		c.pins--
	}
	if err := os.Remove(c.path(it.key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		c.log.Warn("cache: remove item", "path", c.path(it.key), "err", err)
	}
}

func (c *Cache) total() int64 {
	var t int64
	for _, b := range c.bytes {
		t += b
	}
	return t
}

// limit is the bound on the cache's bytes: its maximum less what the node
// keeps outside it under the same budget (SetReserved), but never less
// than a quarter of the maximum.
func (c *Cache) limit() int64 {
	return max(c.max-c.reserved, c.max/4)
}

// SetReserved tells the cache that n bytes of its budget are used outside
// it (a node's unpacked layers), evicting what no longer fits.
func (c *Cache) SetReserved(n int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reserved = max(n, 0)
	if c.max > 0 {
		c.makeRoom(0)
	}
}

// Remove deletes the frame and the file of digest d unless they are in
// use, and reports the bytes freed.
func (c *Cache) Remove(d digest.Digest) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for _, kind := range []kind{kindFrame, kindFile} {
		k, err := keyOf(kind, d)
		if err != nil {
			return 0
		}
		if it := c.items[k]; it != nil && it.pins == 0 {
			n += it.size
			c.removeLocked(it)
		}
	}
	return n
}

// makeRoom evicts unpinned items, least recently used first, until size
// more bytes fit under the bound.
func (c *Cache) makeRoom(size int64) error {
	if c.max <= 0 {
		return nil
	}
	if size > c.max {
		return ErrTooLarge
	}
	limit := c.limit()
	e := c.lru.Back()
	for c.total()+size > limit && e != nil {
		it := e.Value.(*item)
		e = e.Prev()
		if it.pins > 0 {
			continue
		}
		c.log.Debug("cache: evict", "kind", kindDirs[it.key.kind], "digest", "sha256:"+it.key.hex, "size", it.size)
		c.removeLocked(it)
		c.evictions.Add(1)
	}
	if c.total()+size > limit {
		return ErrFull
	}
	return nil
}

// lookup returns the item for k, marking it used, and pins it when pin is
// set; a miss counts as a miss.
func (c *Cache) lookup(k key, pin bool) *item {
	c.mu.Lock()
	defer c.mu.Unlock()
	it := c.items[k]
	if it == nil {
		c.misses.Add(1)
		return nil
	}
	c.lru.MoveToFront(it.elem)
	if pin {
		if it.pins == 0 {
			c.pins++
		}
		it.pins++
	}
	return it
}

// touch marks the item for k used and reports whether there is one.
func (c *Cache) touch(k key) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	it := c.items[k]
	if it != nil {
		c.lru.MoveToFront(it.elem)
	}
	return it != nil
}

func (c *Cache) unpin(it *item) {
	c.mu.Lock()
	defer c.mu.Unlock()
	it.pins--
	if it.pins == 0 && it.elem != nil {
		c.pins--
	}
}

// drop deletes an item that failed verification or vanished from disk.
func (c *Cache) drop(it *item, why string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.items[it.key] != it {
		return // already dropped, or replaced
	}
	c.log.Warn("cache: dropping item", "kind", kindDirs[it.key.kind], "digest", "sha256:"+it.key.hex, "reason", why, "err", err)
	c.removeLocked(it)
}

// Frame returns the compressed bytes of the frame with digest d, verified
// against d. It returns ErrNotFound when the cache does not hold the frame,
// or held corrupt bytes for it, which it deletes.
func (c *Cache) Frame(ctx context.Context, d digest.Digest) ([]byte, error) {
	k, err := keyOf(kindFrame, d)
	if err != nil {
		return nil, fmt.Errorf("cache frame: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	it := c.lookup(k, false)
	if it == nil {
		return nil, ErrNotFound
	}
	b, err := os.ReadFile(c.path(k))
	if err != nil {
		// Evicted since the lookup, or removed behind our back.
		c.misses.Add(1)
		if errors.Is(err, fs.ErrNotExist) {
			c.drop(it, "missing", err)
			return nil, ErrNotFound
		}
		return nil, fmt.Errorf("cache frame %s: %w", d, err)
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != k.hex {
		c.corrupt.Add(1)
		c.misses.Add(1)
		c.drop(it, "digest mismatch", nil)
		return nil, ErrNotFound
	}
	c.hits.Add(1)
	return b, nil
}

// PutFrame stores the compressed bytes of a frame under its digest d,
// after checking that they match it (ErrDigestMismatch). Storing a frame
// the cache already holds only marks it used. It fails with ErrTooLarge or
// ErrFull when the frame cannot fit.
func (c *Cache) PutFrame(ctx context.Context, d digest.Digest, b []byte) error {
	k, err := keyOf(kindFrame, d)
	if err != nil {
		return fmt.Errorf("cache frame: %w", err)
	}
	if err := c.put(ctx, k, int64(len(b)), bytes.NewReader(b)); err != nil {
		return fmt.Errorf("cache frame %s: %w", d, err)
	}
	return nil
}

// PutFile stores the content of a file, read from r, under its content
// digest d. The content becomes visible only once all of it has been read,
// checked against d and size (ErrDigestMismatch) and synced to disk.
// Storing a file the cache already holds only marks it used. It fails with
// ErrTooLarge or ErrFull when the file cannot fit.
func (c *Cache) PutFile(ctx context.Context, d digest.Digest, size int64, r io.Reader) error {
	k, err := keyOf(kindFile, d)
	if err != nil {
		return fmt.Errorf("cache file: %w", err)
	}
	if err := c.put(ctx, k, size, r); err != nil {
		return fmt.Errorf("cache file %s: %w", d, err)
	}
	return nil
}

func (c *Cache) put(ctx context.Context, k key, size int64, r io.Reader) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.max > 0 && size > c.max {
		return ErrTooLarge
	}
	if c.touch(k) {
		return nil
	}
	tmp, err := os.CreateTemp(c.tmpDir(), kindDirs[k.kind]+"-")
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), &ctxReader{ctx: ctx, r: io.LimitReader(r, size+1)})
	if err != nil {
		return err
	}
	if n != size || hex.EncodeToString(h.Sum(nil)) != k.hex {
		return ErrDigestMismatch
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	p := c.path(k)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if it := c.items[k]; it != nil {
		c.lru.MoveToFront(it.elem) // stored meanwhile by someone else
		return nil
	}
	if err := c.makeRoom(size); err != nil {
		return err
	}
	// Strictly increasing modification times keep the recency order of
	// items written within one clock tick when Open rebuilds it.
	stamp := time.Now()
	if !stamp.After(c.lastStamp) {
		stamp = c.lastStamp.Add(time.Microsecond)
	}
	c.lastStamp = stamp
	os.Chtimes(tmp.Name(), stamp, stamp)
	if err := os.Rename(tmp.Name(), p); err != nil {
		return err
	}
	committed = true
	c.insertLocked(&item{key: k, size: size, verified: true})
	return nil
}

// ctxReader stops a copy when its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r *ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// A File is an open file of the cache. It is pinned, never evicted, until
// Close. It embeds the *os.File, opened read-only; use its descriptor as
// a passthrough backing file or read it with ReadAt.
type File struct {
	*os.File
	c    *Cache
	it   *item
	once sync.Once
}

// Close closes the file and unpins it.
func (f *File) Close() error {
	err := f.File.Close()
	f.once.Do(func() { f.c.unpin(f.it) })
	return err
}

// OpenFile opens the file with content digest d. The first open of a file
// after Open hashes it; a file that does not match d is deleted and
// ErrNotFound returned, as when the cache does not hold it.
func (c *Cache) OpenFile(ctx context.Context, d digest.Digest) (*File, error) {
	k, err := keyOf(kindFile, d)
	if err != nil {
		return nil, fmt.Errorf("cache file: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	it := c.lookup(k, true)
	if it == nil {
		return nil, ErrNotFound
	}
	f, err := os.Open(c.path(k))
	if err != nil {
		c.unpin(it)
		c.misses.Add(1)
		if errors.Is(err, fs.ErrNotExist) {
			c.drop(it, "missing", err)
			return nil, ErrNotFound
		}
		return nil, fmt.Errorf("cache file %s: %w", d, err)
	}
	c.mu.Lock()
	verified := it.verified
	c.mu.Unlock()
	if !verified {
		ok, err := verifyFile(ctx, f, it.size, k.hex)
		if err != nil {
			f.Close()
			c.unpin(it)
			return nil, fmt.Errorf("cache file %s: %w", d, err)
		}
		if !ok {
			f.Close()
			c.unpin(it)
			c.corrupt.Add(1)
			c.misses.Add(1)
			c.drop(it, "digest mismatch", nil)
			return nil, ErrNotFound
		}
		c.mu.Lock()
		it.verified = true
		c.mu.Unlock()
	}
	c.hits.Add(1)
	return &File{File: f, c: c, it: it}, nil
}

func verifyFile(ctx context.Context, f *os.File, size int64, want string) (bool, error) {
	var h hash.Hash = sha256.New()
	n, err := io.Copy(h, &ctxReader{ctx: ctx, r: io.NewSectionReader(f, 0, size+1)})
	if err != nil {
		return false, err
	}
	return n == size && hex.EncodeToString(h.Sum(nil)) == want, nil
}

// Contains reports whether the cache holds the file with content digest d,
// without verifying or marking it used.
func (c *Cache) Contains(d digest.Digest) bool {
	k, err := keyOf(kindFile, d)
	if err != nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.items[k] != nil
}

// ContainsFrame reports whether the cache holds the frame with digest d,
// without verifying or marking it used.
func (c *Cache) ContainsFrame(d digest.Digest) bool {
	k, err := keyOf(kindFrame, d)
	if err != nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.items[k] != nil
}

// Stats describe the content and use of a cache.
type Stats struct {
	MaxBytes   int64 // the bound; zero when there is none
	Bytes      int64 // total size of the items
	Items      int
	FrameBytes int64
	Frames     int
	FileBytes  int64
	Files      int
	Pinned     int // items held by open Files

	Hits      int64 // loads that returned an item
	Misses    int64 // loads that found none (including corrupt items)
	Evictions int64
	Corrupt   int64 // items deleted because they did not match their digest
}

// Stats returns the current statistics.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Stats{
		MaxBytes:   max(c.max, 0),
		Bytes:      c.total(),
		Items:      len(c.items),
		FrameBytes: c.bytes[kindFrame],
		Frames:     c.count[kindFrame],
		FileBytes:  c.bytes[kindFile],
		Files:      c.count[kindFile],
		Pinned:     c.pins,
	}
	s.Hits = c.hits.Load()
	s.Misses = c.misses.Load()
	s.Evictions = c.evictions.Load()
	s.Corrupt = c.corrupt.Load()
	return s
}
