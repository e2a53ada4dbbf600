package cache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/cache"
)

func open(t *testing.T, dir string, max int64) *cache.Cache {
	t.Helper()
	c, err := cache.Open(dir, cache.Options{MaxBytes: max})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// blob returns n deterministic bytes that differ by seed.
func blob(seed, n int) []byte {
	r := rand.New(rand.NewPCG(uint64(seed), uint64(n)))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func itemPath(dir, kind string, d digest.Digest) string {
	return filepath.Join(dir, kind, "sha256", d.Encoded()[:2], d.Encoded())
}

func putFrame(t *testing.T, c *cache.Cache, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if err := c.PutFrame(context.Background(), d, b); err != nil {
		t.Fatalf("PutFrame: %v", err)
	}
	return d
}

func putFile(t *testing.T, c *cache.Cache, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if err := c.PutFile(context.Background(), d, int64(len(b)), bytes.NewReader(b)); err != nil {
		t.Fatalf("PutFile: %v", err)
	}
	return d
}

func hasFrame(t *testing.T, c *cache.Cache, d digest.Digest) bool {
	t.Helper()
	_, err := c.Frame(context.Background(), d)
	switch {
	case err == nil:
		return true
	case errors.Is(err, cache.ErrNotFound):
		return false
	}
	t.Fatalf("Frame: %v", err)
	return false
}

func readFile(t *testing.T, c *cache.Cache, d digest.Digest) ([]byte, error) {
	t.Helper()
	f, err := c.OpenFile(context.Background(), d)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.NewSectionReader(f, 0, 1<<40))
}

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	c := open(t, dir, 0)

	frame, file, empty := blob(1, 1000), blob(2, 5000), []byte{}
	fd := putFrame(t, c, frame)
	filed := putFile(t, c, file)
	emptyd := putFile(t, c, empty)
	// Storing again is a no-op.
	putFrame(t, c, frame)
	putFile(t, c, file)

	check := func(c *cache.Cache) {
		t.Helper()
		got, err := c.Frame(ctx, fd)
		if err != nil || !bytes.Equal(got, frame) {
			t.Fatalf("Frame = %d bytes, %v; want the frame", len(got), err)
		}
		for d, want := range map[digest.Digest][]byte{filed: file, emptyd: empty} {
			got, err = readFile(t, c, d)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("OpenFile(%s) = %d bytes, %v; want %d bytes", d, len(got), err, len(want))
			}
		}
		if !c.Contains(filed) || c.Contains(fd) {
			t.Errorf("Contains: file %v (want true), frame as file %v (want false)", c.Contains(filed), c.Contains(fd))
		}
		s := c.Stats()
		want := cache.Stats{Bytes: 6000, Items: 3, FrameBytes: 1000, Frames: 1, FileBytes: 5000, Files: 2}
		s.Hits, s.Misses = 0, 0
		if diff := cmp.Diff(want, s); diff != "" {
			t.Errorf("Stats (-want +got):\n%s", diff)
		}
	}
	check(c)

	// Reopening rebuilds the items and sizes from the directory.
	check(open(t, dir, 0))

	// Misses.
	if _, err := c.Frame(ctx, digest.FromString("nope")); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("Frame(absent) = %v, want ErrNotFound", err)
	}
	if _, err := c.OpenFile(ctx, fd); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("OpenFile(a frame's digest) = %v, want ErrNotFound: kinds are separate", err)
	}
	if _, err := c.Frame(ctx, "md5:abc"); err == nil || errors.Is(err, cache.ErrNotFound) {
		t.Errorf("Frame(bad digest) = %v, want an error other than ErrNotFound", err)
	}
}

func TestPutVerifies(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	c := open(t, dir, 0)
	b := blob(1, 100)
	d := digest.FromBytes(b)
	bad := append([]byte{}, b...)
	bad[7] ^= 1

	if err := c.PutFrame(ctx, d, bad); !errors.Is(err, cache.ErrDigestMismatch) {
		t.Errorf("PutFrame(wrong bytes) = %v, want ErrDigestMismatch", err)
	}
	if err := c.PutFile(ctx, d, 100, bytes.NewReader(bad)); !errors.Is(err, cache.ErrDigestMismatch) {
		t.Errorf("PutFile(wrong bytes) = %v, want ErrDigestMismatch", err)
	}
	if err := c.PutFile(ctx, d, 99, bytes.NewReader(b)); !errors.Is(err, cache.ErrDigestMismatch) {
		t.Errorf("PutFile(wrong size) = %v, want ErrDigestMismatch", err)
	}
	if err := c.PutFile(ctx, d, 100, io.MultiReader(bytes.NewReader(b[:50]), iotestErr{})); err == nil {
		t.Errorf("PutFile(failing reader) succeeded")
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if err := c.PutFile(canceled, d, 100, bytes.NewReader(b)); !errors.Is(err, context.Canceled) {
		t.Errorf("PutFile(canceled) = %v, want context.Canceled", err)
	}
	if s := c.Stats(); s.Items != 0 {
		t.Errorf("%d items after refused puts, want 0", s.Items)
	}
	if _, err := os.Stat(itemPath(dir, "files", d)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused file visible on disk: %v", err)
	}
	tmp, _ := os.ReadDir(filepath.Join(dir, "tmp"))
	if len(tmp) != 0 {
		t.Errorf("temporary files left: %v", tmp)
	}
}

type iotestErr struct{}

func (iotestErr) Read([]byte) (int, error) { return 0, errors.New("boom") }

func TestOpenCleansUp(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 0)
	d := putFrame(t, c, blob(1, 10))

	stray := []string{
		filepath.Join(dir, "tmp", "frames-123"),
		filepath.Join(dir, "frames", "sha256", "zz", "x"),
		filepath.Join(dir, "frames", "sha256", d.Encoded()[:2], "notadigest"),
		filepath.Join(dir, "files", "sha256", "00", d.Encoded()), // wrong fan-out directory
	}
	for _, p := range stray {
		os.MkdirAll(filepath.Dir(p), 0o700)
		if err := os.WriteFile(p, []byte("junk"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c = open(t, dir, 0)
	for _, p := range stray {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived Open: %v", p, err)
		}
	}
	if s := c.Stats(); s.Items != 1 || !hasFrame(t, c, d) {
		t.Errorf("after Open: %d items, frame present %v; want just the frame", s.Items, hasFrame(t, c, d))
	}
}

func TestCorruptionDetected(t *testing.T) {
	ctx := context.Background()
	corruptions := map[string]func(p string) error{
		"flipped byte": func(p string) error {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			b[len(b)/2] ^= 0x40
			return os.WriteFile(p, b, 0o600)
		},
		"truncated": func(p string) error { return os.Truncate(p, 10) },
		"extended": func(p string) error {
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.Write([]byte("x"))
			return err
		},
		"deleted": os.Remove,
	}
	for name, corrupt := range corruptions {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			c := open(t, dir, 0)
			frame, file := blob(1, 4096), blob(2, 8192)
			fd, filed := putFrame(t, c, frame), putFile(t, c, file)

			// Frames are verified on every load.
			if err := corrupt(itemPath(dir, "frames", fd)); err != nil {
				t.Fatal(err)
			}
			if got, err := c.Frame(ctx, fd); !errors.Is(err, cache.ErrNotFound) {
				t.Fatalf("Frame of a corrupt item = %d bytes, %v; want ErrNotFound", len(got), err)
			}
			if _, err := os.Stat(itemPath(dir, "frames", fd)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("corrupt frame not deleted: %v", err)
			}
			// Refetched and stored again, it is served.
			putFrame(t, c, frame)
			if got, err := c.Frame(ctx, fd); err != nil || !bytes.Equal(got, frame) {
				t.Errorf("Frame after refetch = %d bytes, %v", len(got), err)
			}

			// Files are verified on their first open after Open.
			if err := corrupt(itemPath(dir, "files", filed)); err != nil {
				t.Fatal(err)
			}
			c = open(t, dir, 0)
			if got, err := readFile(t, c, filed); !errors.Is(err, cache.ErrNotFound) {
				t.Fatalf("OpenFile of a corrupt item = %d bytes, %v; want ErrNotFound", len(got), err)
			}
			if c.Contains(filed) {
				t.Errorf("corrupt file still listed")
			}
			putFile(t, c, file)
			if got, err := readFile(t, c, filed); err != nil || !bytes.Equal(got, file) {
				t.Errorf("OpenFile after refetch = %d bytes, %v", len(got), err)
			}
			s := c.Stats()
			if name != "deleted" && s.Corrupt != 1 {
				t.Errorf("Stats.Corrupt = %d, want 1", s.Corrupt)
			}
			if s.Items != 2 || s.Bytes != 4096+8192 {
				t.Errorf("Stats = %+v, want 2 items of %d bytes", s, 4096+8192)
			}
		})
	}
}

func TestEvictionOrder(t *testing.T) {
	c := open(t, t.TempDir(), 300)
	a := putFrame(t, c, blob(1, 100))
	b := putFrame(t, c, blob(2, 100))
	cc := putFrame(t, c, blob(3, 100))
	hasFrame(t, c, a) // a is now the most recently used; b the least
	d := putFrame(t, c, blob(4, 100))

	got := map[string]bool{"a": hasFrame(t, c, a), "b": hasFrame(t, c, b), "c": hasFrame(t, c, cc), "d": hasFrame(t, c, d)}
	want := map[string]bool{"a": true, "b": false, "c": true, "d": true}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("present after eviction (-want +got):\n%s", diff)
	}
	if s := c.Stats(); s.Bytes != 300 || s.Evictions != 1 {
		t.Errorf("Stats: %d bytes, %d evictions; want 300, 1", s.Bytes, s.Evictions)
	}
}

func TestPinnedNeverEvicted(t *testing.T) {
	ctx := context.Background()
	c := open(t, t.TempDir(), 1000)
	content := blob(1, 400)
	d := putFile(t, c, content)
	f, err := c.OpenFile(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	// Far more than the cache holds goes through while the file is open.
	for i := range 50 {
		putFrame(t, c, blob(100+i, 200))
	}
	if !c.Contains(d) || c.Stats().Pinned != 1 {
		t.Fatalf("pinned file evicted (stats %+v)", c.Stats())
	}
	if got, err := io.ReadAll(io.NewSectionReader(f, 0, 1000)); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("reading the pinned file: %d bytes, %v", len(got), err)
	}
	// A second open pins it too; one close is not enough to unpin.
	f2, err := c.OpenFile(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	f.Close() // idempotent
	for i := range 10 {
		putFrame(t, c, blob(200+i, 200))
	}
	if !c.Contains(d) {
		t.Fatalf("file evicted while still open once")
	}

	// Everything pinned: a put that does not fit is refused.
	big := blob(2, 700)
	if err := c.PutFile(ctx, digest.FromBytes(big), 700, bytes.NewReader(big)); !errors.Is(err, cache.ErrFull) {
		t.Errorf("PutFile over pinned content = %v, want ErrFull", err)
	}
	f2.Close()
	if s := c.Stats(); s.Pinned != 0 {
		t.Errorf("Stats.Pinned = %d after closing, want 0", s.Pinned)
	}
	putFile(t, c, big) // now fits, evicting the file
	if c.Contains(d) {
		t.Errorf("unpinned least recently used file not evicted")
	}
}

func TestSmallCache(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	c := open(t, dir, 1000)
	var ds []digest.Digest
	for i := range 100 {
		ds = append(ds, putFrame(t, c, blob(i, 300)))
		if s := c.Stats(); s.Bytes > 1000 {
			t.Fatalf("cache at %d bytes, above its bound", s.Bytes)
		}
	}
	present := 0
	for _, d := range ds {
		if hasFrame(t, c, d) {
			present++
		}
	}
	if present != 3 {
		t.Errorf("%d frames present, want the last 3", present)
	}
	big := blob(1, 1001)
	if err := c.PutFrame(ctx, digest.FromBytes(big), big); !errors.Is(err, cache.ErrTooLarge) {
		t.Errorf("PutFrame(larger than the cache) = %v, want ErrTooLarge", err)
	}
	// Reopening with a smaller bound evicts down to it.
	c = open(t, dir, 600)
	if s := c.Stats(); s.Bytes != 600 || s.Items != 2 {
		t.Errorf("after reopening smaller: %+v, want 2 items of 600 bytes", s)
	}
	if !hasFrame(t, c, ds[99]) || hasFrame(t, c, ds[97]) {
		t.Errorf("reopening did not keep the most recent items")
	}
}

func TestConcurrent(t *testing.T) {
	ctx := context.Background()
	c := open(t, t.TempDir(), 20_000)
	const n = 40
	blobs := make([][]byte, n)
	for i := range blobs {
		blobs[i] = blob(i, 500+i*37)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 0))
			for range 300 {
				b := blobs[r.IntN(n)]
				d := digest.FromBytes(b)
				switch r.IntN(4) {
				case 0:
					if err := c.PutFrame(ctx, d, b); err != nil {
						errs <- err
						return
					}
				case 1:
					if err := c.PutFile(ctx, d, int64(len(b)), bytes.NewReader(b)); err != nil && !errors.Is(err, cache.ErrFull) {
						errs <- err
						return
					}
				case 2:
					got, err := c.Frame(ctx, d)
					if err == nil && !bytes.Equal(got, b) {
						errs <- fmt.Errorf("Frame returned wrong bytes")
						return
					}
				case 3:
					f, err := c.OpenFile(ctx, d)
					if err != nil {
						continue
					}
					got, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
					time.Sleep(time.Duration(r.IntN(100)) * time.Microsecond)
					f.Close()
					if err != nil || !bytes.Equal(got, b) {
						errs <- fmt.Errorf("OpenFile read %d bytes, %v", len(got), err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s := c.Stats()
	if s.Bytes > 20_000 || s.Pinned != 0 {
		t.Errorf("after concurrent use: %+v", s)
	}
	// The accounting matches the disk.
	var onDisk int64
	filepath.Walk(c.Dir(), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			onDisk += fi.Size()
		}
		return nil
	})
	if onDisk != s.Bytes {
		t.Errorf("%d bytes on disk, Stats says %d", onDisk, s.Bytes)
	}
}

// TestReservedAndRemove: bytes a node keeps outside the cache under the
// same budget (unpacked layers) shrink what the cache may hold, down to a
// quarter of it; Remove frees an item at once.
func TestReservedAndRemove(t *testing.T) {
	c := open(t, t.TempDir(), 400)
	var ds []digest.Digest
	for i := range 4 {
		ds = append(ds, putFrame(t, c, blob(i, 100)))
	}
	c.SetReserved(200)
	if s := c.Stats(); s.Bytes != 200 {
		t.Fatalf("with 200 of 400 bytes reserved the cache holds %d", s.Bytes)
	}
	c.SetReserved(1000)
	if s := c.Stats(); s.Bytes != 100 {
		t.Fatalf("reserved past the budget: the cache holds %d, want a quarter (100)", s.Bytes)
	}
	last := ds[3]
	if n := c.Remove(last); n != 100 || hasFrame(t, c, last) {
		t.Fatalf("Remove freed %d", n)
	}
	if n := c.Remove(last); n != 0 {
		t.Fatalf("Remove of an absent item freed %d", n)
	}
	c.SetReserved(0)
	for i := range 4 {
		putFrame(t, c, blob(10+i, 100))
	}
	if s := c.Stats(); s.Bytes != 400 {
		t.Fatalf("nothing reserved: the cache holds %d, want 400", s.Bytes)
	}
}
