package layerfs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/strata-oci/strata/internal/layerfs"
)

// faultLayer has a file spanning several frames and small files.
func faultLayer(t *testing.T) (files map[string][]byte, ents []ent) {
	files = map[string][]byte{
		"big":     append(random(1, 2<<20), text(1, 700<<10)...),
		"small":   text(2, 3000),
		"medium":  random(3, 600<<10),
		"d/other": text(4, 50<<10),
	}
	ents = []ent{dir("d/", 0o755)}
	for _, name := range []string{"big", "d/other", "medium", "small"} {
		ents = append(ents, file(name, 0o644, files[name]))
	}
	return files, ents
}

// fastFail bounds fetches tightly, for tests of failing sources.
var fastFail = layerfs.Options{
	MissWindow:     -1, // a fault hits the frames read, not their neighbours
	FetchTimeout:   2 * time.Second,
	AttemptTimeout: 300 * time.Millisecond,
	Attempts:       3,
}

func TestSourceFaults(t *testing.T) {
	_, ents := faultLayer(t)
	ix, data := build(t, tarOf(t, ents...))
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })

	tests := []struct {
		name  string
		fault func(ctx context.Context, off, n int64, b []byte) error
	}{
		{"errors", func(ctx context.Context, off, n int64, b []byte) error {
			return errors.New("503 service unavailable")
		}},
		{"hangs ignoring its context", func(ctx context.Context, off, n int64, b []byte) error {
			<-release
			return errors.New("released")
		}},
		{"hangs until canceled", func(ctx context.Context, off, n int64, b []byte) error {
			<-ctx.Done()
			return ctx.Err()
		}},
		{"corrupts", func(ctx context.Context, off, n int64, b []byte) error {
			b[len(b)/2] ^= 0x10
			return nil
		}},
		{"truncates", func(ctx context.Context, off, n int64, b []byte) error {
			return fmt.Errorf("unexpected EOF")
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := &memSource{data: data}
			src.setFault(tc.fault)
			for _, passthrough := range []bool{true, false} {
				opts := fastFail
				opts.DisablePassthrough = !passthrough
				f, mnt := mount(t, ix, src, openCache(t, t.TempDir(), 0), opts)
				for _, name := range []string{"small", "big"} {
					start := time.Now()
					got, err := os.ReadFile(filepath.Join(mnt, name))
					elapsed := time.Since(start)
					if !errors.Is(err, syscall.EIO) {
						t.Errorf("passthrough %v: reading %s: %d bytes, %v; want EIO", passthrough, name, len(got), err)
					}
					// Generous: this only catches a read that hangs.
					if elapsed > 3*opts.FetchTimeout {
						t.Errorf("reading %s failed after %v, beyond the bound of %v", name, elapsed, opts.FetchTimeout)
					}
				}
				if s := f.Stats(); s.SourceErrors+s.CorruptFrames == 0 || (s.BytesFetched != 0 && tc.name != "corrupts") {
					t.Errorf("stats %+v", s)
				}
			}
		})
	}
}

// TestCorruptOnce: a frame that fails verification once is refetched.
func TestCorruptOnce(t *testing.T) {
	files, ents := faultLayer(t)
	ix, data := build(t, tarOf(t, ents...))
	src := &memSource{data: data}
	var corrupted sync.Map
	src.setFault(func(ctx context.Context, off, n int64, b []byte) error {
		if _, done := corrupted.LoadOrStore(off, true); !done {
			b[0] ^= 1
		}
		return nil
	})
	f, mnt := mount(t, ix, src, nil, fastFail)
	for name, want := range files {
		if got := readFile(t, filepath.Join(mnt, name)); !bytes.Equal(got, want) {
			t.Errorf("%s: wrong content", name)
		}
	}
	if s := f.Stats(); s.CorruptFrames == 0 || s.FramesFetched != int64(len(ix.Frames)) {
		t.Errorf("stats %+v: want corrupt frames, and every frame fetched once", s)
	}
}

// TestTransientErrors: errors that stop within the retry budget are
// invisible.
func TestTransientErrors(t *testing.T) {
	files, ents := faultLayer(t)
	ix, data := build(t, tarOf(t, ents...))
	src := &memSource{data: data}
	// The first request for every range fails (concurrent readahead
	// requests interleave, so this is per range, not every other call).
	var failed sync.Map
	src.setFault(func(ctx context.Context, off, n int64, b []byte) error {
		if _, again := failed.LoadOrStore([2]int64{off, n}, true); !again {
			return errors.New("connection reset")
		}
		return nil
	})
	f, mnt := mount(t, ix, src, nil, fastFail)
	for name, want := range files {
		if got := readFile(t, filepath.Join(mnt, name)); !bytes.Equal(got, want) {
			t.Errorf("%s: wrong content", name)
		}
	}
	if s := f.Stats(); s.SourceErrors == 0 {
		t.Errorf("stats %+v: want source errors", s)
	}
}

// TestCachedSurvivesSourceFailure: what a node fetched once stays
// readable, from its cache, when the source is gone.
func TestCachedSurvivesSourceFailure(t *testing.T) {
	files, ents := faultLayer(t)
	ix, data := build(t, tarOf(t, ents...))
	for _, passthrough := range []bool{true, false} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			cacheDir := t.TempDir()
			src := &memSource{data: data}
			opts := fastFail
			opts.DisablePassthrough = !passthrough

			f, mnt := mount(t, ix, src, openCache(t, cacheDir, 0), opts)
			for name, want := range files {
				if got := readFile(t, filepath.Join(mnt, name)); !bytes.Equal(got, want) {
					t.Fatalf("%s: wrong content", name)
				}
			}
			if s := f.Stats(); s.BytesFetched != ix.DataSize {
				t.Errorf("reading everything fetched %d bytes, want the data blob's %d", s.BytesFetched, ix.DataSize)
			}

			// Another mount, another cache instance on the same directory
			// (as after a restart), and a source that only fails. The
			// first FS's last frames are cached once its fetches end.
			f.Close()
			src.setFault(func(ctx context.Context, off, n int64, b []byte) error { return errors.New("gone") })
			f2, mnt2 := mount(t, ix, src, openCache(t, cacheDir, 0), opts)
			for name, want := range files {
				if got := readFile(t, filepath.Join(mnt2, name)); !bytes.Equal(got, want) {
					t.Errorf("%s: wrong content", name)
				}
			}
			if s := f2.Stats(); s.BytesFetched != 0 || s.SourceErrors != 0 {
				t.Errorf("stats %+v: want everything from the cache", s)
			}
		})
	}
}

// TestSmallCache reads a layer through a cache far smaller than it.
func TestSmallCache(t *testing.T) {
	files, ents := faultLayer(t)
	for i := range 20 {
		name := fmt.Sprintf("many/%02d", i)
		files[name] = random(100+i, 150<<10)
		if i == 0 {
			ents = append(ents, dir("many/", 0o755))
		}
		ents = append(ents, file(name, 0o644, files[name]))
	}
	ix, data := build(t, tarOf(t, ents...))
	const max = 1 << 20
	if ix.DataSize < 5*max {
		t.Fatalf("layer of %d bytes is not much larger than the cache", ix.DataSize)
	}
	src := &memSource{data: data}
	c := openCache(t, t.TempDir(), max)
	f, mnt := mount(t, ix, src, c, layerfs.Options{MemoryBytes: 1})
	for round := range 2 {
		for name, want := range files {
			if got := readFile(t, filepath.Join(mnt, name)); !bytes.Equal(got, want) {
				t.Errorf("round %d: %s: wrong content", round, name)
			}
		}
	}
	if s := c.Stats(); s.Bytes > max || s.Evictions == 0 {
		t.Errorf("cache stats %+v: want evictions and at most %d bytes", s, max)
	}
	if s := f.Stats(); s.BytesFetched <= ix.DataSize {
		t.Logf("stats %+v", s) // the page cache may have served the second round
	}
}

// TestConcurrentReadsFetchOnce: readers of the same frames share one fetch.
func TestConcurrentReadsFetchOnce(t *testing.T) {
	files, ents := faultLayer(t)
	ix, data := build(t, tarOf(t, ents...))
	src := &memSource{data: data}
	src.setFault(func(ctx context.Context, off, n int64, b []byte) error {
		time.Sleep(50 * time.Millisecond)
		return nil
	})
	f, mnt := mount(t, ix, src, nil, layerfs.Options{DisablePassthrough: true})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fh, err := os.Open(filepath.Join(mnt, "big"))
			if err != nil {
				t.Error(err)
				return
			}
			defer fh.Close()
			buf := make([]byte, 64<<10)
			want := files["big"]
			for off := int64(g) * 4096; off < int64(len(want)); off += int64(len(buf)) * 3 {
				n, err := fh.ReadAt(buf, off)
				if n == 0 || !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
					t.Errorf("reader %d at %d: %d bytes, %v", g, off, n, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	first, last := ix.FramesFor(0, 1<<40)
	if s := f.Stats(); s.FramesFetched > int64(last-first+1) {
		t.Errorf("fetched %d frames, the layer has %d: some were fetched twice", s.FramesFetched, last-first+1)
	}
}
