package layerfs_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/testenv"
)

// readSome opens p, reads n bytes at off through the daemon and closes it.
func readSome(t *testing.T, p string, off int64, n int) {
	t.Helper()
	fh, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.ReadAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond for up to 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCompleter(t *testing.T) {
	testenv.RequireFUSE(t)
	big, lib, bad := random(11, 3<<20), random(12, 2<<20), random(13, 2<<20)
	ix, data := build(t, tarOf(t,
		file("big.bin", 0o644, big),
		file("lib.so", 0o755, lib),
		file("bad.bin", 0o644, bad),
	))
	src := &memSource{data: data}
	c := openCache(t, t.TempDir(), 0)
	comp := layerfs.NewCompleter(layerfs.CompleterOptions{Quiet: 200 * time.Millisecond})
	defer comp.Close()
	opts := layerfs.Options{Completer: comp}
	f, err := layerfs.New(ix, src, c, opts)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	srv, err := f.Mount(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}

	// A 3 MiB file, of which 64 KiB are read: served by the daemon, then
	// completed once its handle is closed and the node is quiet, even
	// though its layer is unmounted meanwhile.
	readSome(t, filepath.Join(dir, "big.bin"), 1<<20, 64<<10)
	read := src.bytes.Load()
	if s := f.Stats(); s.ServedOpens != 1 || s.PassthroughOpens != 0 {
		t.Fatalf("stats %+v: want the file served", s)
	}
	waitFor(t, "the file handed to the completer", func() bool { return comp.Stats().Pending+int(comp.Stats().Files) > 0 })
	unmount(t, srv.Unmount, dir)
	f.Close()
	select {
	case <-comp.Idle():
	case <-time.After(20 * time.Second):
		t.Fatal("completion did not end")
	}
	st := comp.Stats()
	if st.Files != 1 || st.Bytes != int64(len(big)) || st.Failed != 0 {
		t.Fatalf("completer stats %+v: want big.bin completed", st)
	}
	if !c.Contains(digest.FromBytes(big)) {
		t.Fatal("big.bin is not in the cache")
	}
	// It fetched the rest of the file, not the frames the read had.
	if got := src.bytes.Load() - read; got != st.Fetched || read+got < int64(len(big)) || read+got > int64(len(big))+(128<<10) {
		t.Errorf("the read fetched %d bytes, completion %d (counted %d), for a file of %d", read, got, st.Fetched, len(big))
	}

	// The next mount opens it with passthrough.
	f, dir = mount(t, ix, src, c, opts)
	fh, err := os.Open(filepath.Join(dir, "big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	s := f.Stats()
	if s.PassthroughOpens == 0 {
		fh.Close()
		testenv.Unavailable(t, "the kernel does not take FUSE passthrough backing files")
	}
	if got := readAll(t, fh); !bytes.Equal(got, big) {
		t.Errorf("big.bin through passthrough: wrong content (%d bytes)", len(got))
	}
	fh.Close()

	// While the FS records a start-up profile, nothing is completed: the
	// recording must see the reads.
	f.StartRecording()
	readSome(t, filepath.Join(dir, "lib.so"), 0, 4096)
	waitFor(t, "lib.so handed to the completer", func() bool { return comp.Stats().Pending >= 1 })
	held := comp.Stats().HeldBack
	waitFor(t, "the completer to find the node quiet and held back", func() bool { return comp.Stats().HeldBack >= held+2 })
	if st := comp.Stats(); st.Files != 1 {
		t.Fatalf("completer stats %+v: a file was completed during a recording", st)
	}
	f.StopRecording()
	waitFor(t, "lib.so completed", func() bool { return c.Contains(digest.FromBytes(lib)) })

	// A frame that fails verification fails the completion: nothing is
	// put into the cache, and the daemon goes on serving the file.
	readSome(t, filepath.Join(dir, "bad.bin"), 0, 4096)
	src.setFault(func(ctx context.Context, off, n int64, b []byte) error {
		for i := range b {
			b[i] ^= 0xff
		}
		return nil
	})
	waitFor(t, "the completion of bad.bin to fail", func() bool { return comp.Stats().Failed == 1 })
	if c.Contains(digest.FromBytes(bad)) {
		t.Error("a file that failed verification is in the cache")
	}
	src.setFault(nil)
	if got := readFile(t, filepath.Join(dir, "bad.bin")); !bytes.Equal(got, bad) {
		t.Error("bad.bin: wrong content after a failed completion")
	}
	// ... and does not try it again at once: the close of that read hands
	// it over, and it is declined.
	waitFor(t, "the failed file to be declined", func() bool { return comp.Stats().Declined >= 1 })
	if st := comp.Stats(); st.Failed != 1 || st.Pending != 0 || c.Contains(digest.FromBytes(bad)) {
		t.Errorf("completer stats %+v: a failed file was tried again at once", st)
	}
}

// TestCompleterClose: closing a Completer abandons the file it is
// completing and leaves nothing of it in the cache.
func TestCompleterClose(t *testing.T) {
	testenv.RequireFUSE(t)
	big := random(21, 4<<20)
	ix, data := build(t, tarOf(t, file("big.bin", 0o644, big)))
	src := &memSource{data: data}
	stalled := make(chan struct{}, 1)
	c := openCache(t, t.TempDir(), 0)
	comp := layerfs.NewCompleter(layerfs.CompleterOptions{Quiet: 50 * time.Millisecond})
	_, dir := mount(t, ix, src, c, layerfs.Options{Completer: comp})
	readSome(t, filepath.Join(dir, "big.bin"), 0, 4096)
	src.setFault(func(ctx context.Context, off, n int64, b []byte) error {
		select {
		case stalled <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return ctx.Err()
	})
	select {
	case <-stalled:
	case <-time.After(20 * time.Second):
		t.Fatal("the completion did not start")
	}
	done := make(chan struct{})
	go func() { comp.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if c.Contains(digest.FromBytes(big)) {
		t.Error("an abandoned completion is in the cache")
	}
	if st := comp.Stats(); st.Files != 0 || st.Failed != 0 || st.Pending != 0 {
		t.Errorf("completer stats %+v", st)
	}
	select {
	case <-comp.Idle():
	default:
		t.Error("a closed completer is not idle")
	}
}
