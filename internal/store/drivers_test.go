package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/s3test"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/internal/store/s3store"
)

// A backend opens stores on one kind of driver: each call of fresh a new
// empty store, and reopen a second Store on the same storage (another
// process, or the same after a restart).
type backend struct {
	name  string
	fresh func(t *testing.T) (s *store.Store, reopen func() *store.Store)
	// partSize is the size of the driver's parts (0: none).
	partSize int64
}

func filesystemBackend() backend {
	return backend{name: "filesystem", fresh: func(t *testing.T) (*store.Store, func() *store.Store) {
		root := t.TempDir()
		s, err := store.Open(root)
		if err != nil {
			t.Fatal(err)
		}
		return s, func() *store.Store {
			s, err := store.Open(root)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
	}}
}

func s3Backend(t *testing.T) backend {
	srv := s3test.Start(t)
	srv.SetEnv(t)
	return backend{name: "s3", partSize: s3store.MinPartSize, fresh: func(t *testing.T) (*store.Store, func() *store.Store) {
		bucket := srv.Bucket(t)
		open := func() *store.Store {
			d, err := s3store.Open(context.Background(), s3store.Options{
				Bucket: bucket, Prefix: "reg", Endpoint: srv.Endpoint, PathStyle: true, PartSize: s3store.MinPartSize,
			})
			if err != nil {
				t.Fatal(err)
			}
			s, err := store.OpenDriver(d, store.Options{LocalDir: t.TempDir(), Redirect: true})
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		return open(), open
	}}
}

// TestDrivers runs the store's behaviour on each driver: the filesystem
// and S3 (SeaweedFS).
func TestDrivers(t *testing.T) {
	cases := []struct {
		name string
		run  func(t *testing.T, b backend)
	}{
		{"UploadCommitAndMismatch", testUploadCommitAndMismatch},
		{"RestartedSessions", testRestartedSessions},
		{"LargeChunkedUpload", testLargeChunkedUpload},
		{"ManySmallChunks", testManySmallChunks},
		{"FailedChunkRollsBack", testFailedChunkRollsBack},
		{"PutBlobAndRefusals", testPutBlobAndRefusals},
		{"ConcurrentPushesOfOneBlob", testConcurrentPushes},
		{"RangedReads", testRangedReads},
		{"CommitFile", testCommitFile},
		{"ManifestsTagsReferrers", testManifestsTagsReferrers},
		{"CancelAndPurgeUploads", testCancelAndPurge},
		{"Listings", testListings},
	}
	run := func(t *testing.T, b backend) {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) { c.run(t, b) })
		}
	}
	t.Run("filesystem", func(t *testing.T) { run(t, filesystemBackend()) })
	t.Run("s3", func(t *testing.T) { run(t, s3Backend(t)) })
}

var ctx = context.Background()

func randomBytes(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

func readBlob(t *testing.T, s *store.Store, repo string, d digest.Digest) []byte {
	t.Helper()
	f, err := s.OpenBlob(ctx, repo, d)
	if err != nil {
		t.Fatalf("open blob %s: %v", d, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testUploadCommitAndMismatch(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	data := []byte("hello, blob")
	d := digest.FromBytes(data)
	id, err := s.NewUpload(ctx, "a/b")
	if err != nil {
		t.Fatal(err)
	}
	if !s.UploadExists(id) {
		t.Fatal("new session does not exist")
	}
	if _, err := s.AppendUpload(ctx, "a/b", id, 0, 5, bytes.NewReader(data[:5])); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AppendUpload(ctx, "a/b", id, 7, 4, bytes.NewReader(data[7:])); !errors.Is(err, store.ErrRangeInvalid) {
		t.Fatalf("out-of-order chunk: err = %v, want ErrRangeInvalid", err)
	}
	if _, err := s.UploadStatus(ctx, "other", id); !errors.Is(err, store.ErrUploadUnknown) {
		t.Fatalf("session from another repo: err = %v", err)
	}
	if s.HasBlob(d) {
		t.Fatal("a blob is visible before commit")
	}
	if n, err := s.AppendUpload(ctx, "a/b", id, -1, -1, bytes.NewReader(data[5:])); err != nil || n != int64(len(data)) {
		t.Fatalf("append: %d %v", n, err)
	}
	if n, err := s.CommitUpload(ctx, "a/b", id, d); err != nil || n != int64(len(data)) {
		t.Fatalf("commit: n=%d err=%v", n, err)
	}
	if s.UploadExists(id) {
		t.Error("session survives its commit")
	}
	if n, err := s.StatBlob(ctx, "a/b", d); err != nil || n != int64(len(data)) {
		t.Fatalf("stat: %d %v", n, err)
	}
	if _, err := s.StatBlob(ctx, "c", d); !errors.Is(err, store.ErrBlobUnknown) {
		t.Fatalf("blob visible in a repository it was not pushed to: %v", err)
	}
	if got := readBlob(t, s, "a/b", d); !bytes.Equal(got, data) {
		t.Fatalf("blob = %q", got)
	}

	id2, _ := s.NewUpload(ctx, "a/b")
	s.AppendUpload(ctx, "a/b", id2, -1, -1, strings.NewReader("other bytes"))
	wrong := digest.FromString("something else")
	if _, err := s.CommitUpload(ctx, "a/b", id2, wrong); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("bad digest commit: %v", err)
	}
	if s.HasBlob(wrong) || s.HasBlob(digest.FromString("other bytes")) {
		t.Fatal("a mismatching upload left a blob")
	}
	if _, err := s.UploadStatus(ctx, "a/b", id2); !errors.Is(err, store.ErrUploadUnknown) {
		t.Fatalf("session survives a failed commit: %v", err)
	}
	if err := s.DeleteBlob(ctx, "a/b", d); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteBlob(ctx, "a/b", d); !errors.Is(err, store.ErrBlobUnknown) {
		t.Fatalf("second delete: %v", err)
	}
}

// testRestartedSessions: a session continued by another Store (another
// process) commits, with sha256 (hash state kept or the bytes read again)
// and sha512.
func testRestartedSessions(t *testing.T, b backend) {
	s, reopen := b.fresh(t)
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.SHA512} {
		data := randomBytes(5000, 1)
		id, _ := s.NewUpload(ctx, "r")
		if _, err := s.AppendUpload(ctx, "r", id, 0, 2000, bytes.NewReader(data[:2000])); err != nil {
			t.Fatal(err)
		}
		s2 := reopen()
		if n, err := s2.UploadStatus(ctx, "r", id); err != nil || n != 2000 {
			t.Fatalf("status after restart: %d %v", n, err)
		}
		if _, err := s2.AppendUpload(ctx, "r", id, 2000, 3000, bytes.NewReader(data[2000:])); err != nil {
			t.Fatal(err)
		}
		d := alg.FromBytes(data)
		if _, err := reopen().CommitUpload(ctx, "r", id, d); err != nil {
			t.Fatalf("%s: %v", alg, err)
		}
		if n, err := s.StatBlob(ctx, "r", d); err != nil || n != 5000 {
			t.Fatalf("%s blob: %d %v", alg, n, err)
		}
		if got := readBlob(t, s, "r", d); !bytes.Equal(got, data) {
			t.Fatalf("%s blob content differs", alg)
		}
	}
}

// testLargeChunkedUpload sends a blob of several parts in chunks that do
// not fall on part boundaries, across stores.
func testLargeChunkedUpload(t *testing.T, b backend) {
	s, reopen := b.fresh(t)
	part := b.partSize
	if part == 0 {
		part = 5 << 20
	}
	data := randomBytes(int(2*part+part/2+12345), 2)
	d := digest.FromBytes(data)
	id, _ := s.NewUpload(ctx, "big")
	cuts := []int64{0, part / 3, part + 7, part + 9, 2*part + 1, int64(len(data))}
	for i := 0; i+1 < len(cuts); i++ {
		st := s
		if i%2 == 1 {
			st = reopen()
		}
		chunk := data[cuts[i]:cuts[i+1]]
		n, err := st.AppendUpload(ctx, "big", id, cuts[i], int64(len(chunk)), bytes.NewReader(chunk))
		if err != nil || n != cuts[i+1] {
			t.Fatalf("chunk %d: size %d, %v", i, n, err)
		}
	}
	if n, err := s.CommitUpload(ctx, "big", id, d); err != nil || n != int64(len(data)) {
		t.Fatalf("commit: %d %v", n, err)
	}
	if got := readBlob(t, s, "big", d); !bytes.Equal(got, data) {
		t.Fatalf("blob differs: %d bytes", len(got))
	}
}

// testManySmallChunks sends a blob of more than a part in chunks much
// smaller than one (each a piece of the tail on S3 until a part fills).
func testManySmallChunks(t *testing.T, b backend) {
	s, reopen := b.fresh(t)
	data := randomBytes(int(max(b.partSize, 1<<20)*3/2), 8)
	d := digest.FromBytes(data)
	id, _ := s.NewUpload(ctx, "r")
	const chunk = 200 << 10
	for off := 0; off < len(data); off += chunk {
		st := s
		if off/chunk%3 == 1 {
			st = reopen()
		}
		end := min(off+chunk, len(data))
		if n, err := st.AppendUpload(ctx, "r", id, int64(off), int64(end-off), bytes.NewReader(data[off:end])); err != nil || n != int64(end) {
			t.Fatalf("chunk at %d: %d %v", off, n, err)
		}
	}
	if _, err := reopen().CommitUpload(ctx, "r", id, d); err != nil {
		t.Fatal(err)
	}
	if got := readBlob(t, s, "r", d); !bytes.Equal(got, data) {
		t.Fatal("blob differs")
	}
}

type failingReader struct {
	r     io.Reader
	after int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, errors.New("connection reset")
	}
	if len(p) > f.after {
		p = p[:f.after]
	}
	n, err := f.r.Read(p)
	f.after -= n
	return n, err
}

// testFailedChunkRollsBack: a chunk cut short leaves the session as it
// was before the chunk.
func testFailedChunkRollsBack(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	part := max(b.partSize, 1<<20)
	data := randomBytes(int(part+part/2), 3)
	d := digest.FromBytes(data)
	id, _ := s.NewUpload(ctx, "r")
	first := int64(1000)
	if _, err := s.AppendUpload(ctx, "r", id, 0, first, bytes.NewReader(data[:first])); err != nil {
		t.Fatal(err)
	}
	// Cut after more than a part: a part was uploaded, then dropped.
	rest := data[first:]
	if _, err := s.AppendUpload(ctx, "r", id, first, -1, &failingReader{r: bytes.NewReader(rest), after: int(part + 10)}); err == nil {
		t.Fatal("a failing chunk was accepted")
	}
	if n, err := s.UploadStatus(ctx, "r", id); err != nil || n != first {
		t.Fatalf("after a failed chunk: size %d, %v; want %d", n, err, first)
	}
	if _, err := s.AppendUpload(ctx, "r", id, first, int64(len(rest)), bytes.NewReader(rest)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CommitUpload(ctx, "r", id, d); err != nil {
		t.Fatal(err)
	}
	if got := readBlob(t, s, "r", d); !bytes.Equal(got, data) {
		t.Fatal("blob differs")
	}
}

func testPutBlobAndRefusals(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	d := digest.FromString("expected")
	if err := s.PutBlob(ctx, "r", d, -1, strings.NewReader("actual")); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("err = %v", err)
	}
	if err := s.PutBlob(ctx, "r", digest.FromString("abc"), 10, strings.NewReader("abc")); !errors.Is(err, store.ErrSizeInvalid) {
		t.Fatalf("size mismatch err = %v", err)
	}
	// Over a part, refused at the end: the multipart upload is dropped.
	big := randomBytes(int(max(b.partSize, 1<<20)+100), 4)
	if err := s.PutBlob(ctx, "r", digest.FromString("not big"), -1, bytes.NewReader(big)); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("big mismatch: %v", err)
	}
	if blobs, err := s.Blobs(ctx); err != nil || len(blobs) != 0 {
		t.Fatalf("blobs after refused pushes: %v %v", blobs, err)
	}
	bd := digest.FromBytes(big)
	if err := s.PutBlob(ctx, "r", bd, int64(len(big)), bytes.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	if got := readBlob(t, s, "r", bd); !bytes.Equal(got, big) {
		t.Fatal("blob differs")
	}
	// Stored already: the bytes must still be the blob's.
	if err := s.PutBlob(ctx, "other", bd, -1, strings.NewReader("x")); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("link by digest alone: %v", err)
	}
	if err := s.MountBlob(ctx, "other", "r", bd); err != nil {
		t.Fatal(err)
	}
	if err := s.MountBlob(ctx, "third", "nope", bd); !errors.Is(err, store.ErrBlobUnknown) {
		t.Fatalf("mount from a repository without it: %v", err)
	}
}

func testConcurrentPushes(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	data := bytes.Repeat([]byte("x"), 1<<20)
	d := digest.FromBytes(data)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			repo := "r" + string(rune('a'+i))
			if i%2 == 0 {
				errs <- s.PutBlob(ctx, repo, d, int64(len(data)), bytes.NewReader(data))
				return
			}
			id, err := s.NewUpload(ctx, repo)
			if err == nil {
				_, err = s.AppendUpload(ctx, repo, id, -1, -1, bytes.NewReader(data))
			}
			if err == nil {
				_, err = s.CommitUpload(ctx, repo, id, d)
			}
			errs <- err
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := readBlob(t, s, "ra", d); !bytes.Equal(got, data) {
		t.Fatal("blob content differs after concurrent pushes")
	}
}

func testRangedReads(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	data := randomBytes(3<<20+17, 5)
	d := digest.FromBytes(data)
	if err := s.PutBlob(ctx, "r", d, int64(len(data)), bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	f, err := s.OpenBlob(ctx, "r", d)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, err := f.Seek(0, io.SeekEnd); err != nil || n != int64(len(data)) {
		t.Fatalf("size by seek: %d %v", n, err)
	}
	for _, r := range []struct{ off, n int64 }{{0, 10}, {1 << 20, 1 << 20}, {int64(len(data)) - 5, 5}, {12345, 2<<20 + 3}} {
		p := make([]byte, r.n)
		if n, err := f.ReadAt(p, r.off); err != nil || int64(n) != r.n || !bytes.Equal(p, data[r.off:r.off+r.n]) {
			t.Fatalf("ReadAt %d+%d: %d %v", r.off, r.n, n, err)
		}
		if _, err := f.Seek(r.off, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		q := make([]byte, r.n)
		if _, err := io.ReadFull(f, q); err != nil || !bytes.Equal(q, data[r.off:r.off+r.n]) {
			t.Fatalf("seek and read %d+%d: %v", r.off, r.n, err)
		}
	}
	p := make([]byte, 10)
	if n, err := f.ReadAt(p, int64(len(data))-4); n != 4 || err != io.EOF {
		t.Fatalf("ReadAt past the end: %d %v", n, err)
	}
	if _, err := s.OpenBlob(ctx, "other", d); !errors.Is(err, store.ErrBlobUnknown) {
		t.Fatalf("open from another repository: %v", err)
	}
}

func testCommitFile(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	f, err := s.CreateTemp("x-")
	if err != nil {
		t.Fatal(err)
	}
	data := randomBytes(int(max(b.partSize, 1<<20)+3), 6)
	f.Write(data)
	f.Close()
	d := digest.FromBytes(data)
	if err := s.CommitFile(ctx, "r", f.Name(), digest.FromString("wrong")); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("wrong digest: %v", err)
	}
	f, _ = s.CreateTemp("x-")
	f.Write(data)
	f.Close()
	if err := s.CommitFile(ctx, "r", f.Name(), d); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f.Name()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary file left: %v", err)
	}
	if got := readBlob(t, s, "r", d); !bytes.Equal(got, data) {
		t.Fatal("blob differs")
	}
}

func testManifestsTagsReferrers(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	subject := []byte(`{"schemaVersion":2}`)
	sd := digest.FromBytes(subject)
	mt := "application/vnd.oci.image.manifest.v1+json"
	if _, err := s.Tags(ctx, "r"); !errors.Is(err, store.ErrNameUnknown) {
		t.Fatalf("tags of nothing: %v", err)
	}
	if err := s.PutManifest(ctx, "r", store.Manifest{Digest: sd, MediaType: mt, Content: subject}, store.ManifestMeta{}, []string{"latest", "v1"}); err != nil {
		t.Fatal(err)
	}
	ref := []byte(`{"schemaVersion":2,"subject":"x"}`)
	rd := digest.FromBytes(ref)
	meta := store.ManifestMeta{Subject: sd, ArtifactType: "application/example", Annotations: map[string]string{"k": "v"}}
	if err := s.PutManifest(ctx, "r", store.Manifest{Digest: rd, MediaType: mt, Content: ref}, meta, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.PutManifest(ctx, "lib/deep/r", store.Manifest{Digest: sd, MediaType: mt, Content: subject}, store.ManifestMeta{}, nil); err != nil {
		t.Fatal(err)
	}
	refs, err := s.Referrers(ctx, "r", sd)
	if err != nil || len(refs) != 1 || refs[0].Digest != rd || refs[0].ArtifactType != "application/example" || refs[0].Annotations["k"] != "v" {
		t.Fatalf("referrers = %+v, %v", refs, err)
	}
	if got, err := s.Resolve(ctx, "r", "v1"); err != nil || got != sd {
		t.Fatalf("resolve: %s %v", got, err)
	}
	m, err := s.GetManifest(ctx, "r", sd)
	if err != nil || !bytes.Equal(m.Content, subject) || m.MediaType != mt {
		t.Fatalf("get manifest: %+v %v", m, err)
	}
	if err := s.Tag(ctx, "r", "v2", rd); err != nil {
		t.Fatal(err)
	}
	if err := s.Untag(ctx, "r", "v2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Untag(ctx, "r", "v2"); !errors.Is(err, store.ErrManifestUnknown) {
		t.Fatalf("untag twice: %v", err)
	}
	tags, _ := s.Tags(ctx, "r")
	if strings.Join(tags, ",") != "latest,v1" {
		t.Fatalf("tags = %v", tags)
	}
	repos, _ := s.Repositories(ctx)
	if strings.Join(repos, ",") != "lib/deep/r,r" {
		t.Fatalf("repositories = %v", repos)
	}
	if err := s.DeleteManifest(ctx, "r", rd); err != nil {
		t.Fatal(err)
	}
	if refs, _ := s.Referrers(ctx, "r", sd); len(refs) != 0 {
		t.Fatalf("deleted referrer still listed: %v", refs)
	}
	if err := s.DeleteManifest(ctx, "r", sd); err != nil {
		t.Fatal(err)
	}
	if tags, _ := s.Tags(ctx, "r"); len(tags) != 0 {
		t.Fatalf("tags of a deleted manifest remain: %v", tags)
	}
	if _, err := s.GetManifest(ctx, "r", sd); !errors.Is(err, store.ErrManifestUnknown) {
		t.Fatalf("deleted manifest: %v", err)
	}
}

func testCancelAndPurge(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	big := randomBytes(int(max(b.partSize, 1<<20)+10), 7)
	cancelled, _ := s.NewUpload(ctx, "r")
	s.AppendUpload(ctx, "r", cancelled, -1, -1, bytes.NewReader(big))
	if err := s.CancelUpload(ctx, "r", cancelled); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UploadStatus(ctx, "r", cancelled); !errors.Is(err, store.ErrUploadUnknown) {
		t.Fatalf("cancelled session: %v", err)
	}
	if s.UploadExists(cancelled) {
		t.Fatal("cancelled session exists")
	}
	a, _ := s.NewUpload(ctx, "r")
	s.AppendUpload(ctx, "r", a, -1, -1, bytes.NewReader(big))
	c, _ := s.NewUpload(ctx, "r")
	if n, err := s.PurgeUploads(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("purged %d fresh sessions, %v", n, err)
	}
	if n, err := s.PurgeUploads(ctx, -time.Hour); err != nil || n != 2 {
		t.Fatalf("purged %d, %v; want 2", n, err)
	}
	for _, id := range []string{a, c} {
		if _, err := s.UploadStatus(ctx, "r", id); !errors.Is(err, store.ErrUploadUnknown) {
			t.Fatalf("purged session %s: %v", id, err)
		}
	}
}

func testListings(t *testing.T, b backend) {
	s, _ := b.fresh(t)
	var ds []digest.Digest
	for i := range 3 {
		data := []byte(fmt.Sprintf("blob %d", i))
		d := digest.FromBytes(data)
		ds = append(ds, d)
		if err := s.PutBlob(ctx, fmt.Sprintf("repo%d", i%2), d, -1, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
	}
	blobs, err := s.Blobs(ctx)
	if err != nil || len(blobs) != 3 {
		t.Fatalf("blobs: %v %v", blobs, err)
	}
	links, err := s.Links(ctx, "repo0")
	if err != nil || len(links) != 2 {
		t.Fatalf("links of repo0: %v %v", links, err)
	}
	repos, err := s.StoredRepositories(ctx)
	if err != nil || strings.Join(repos, ",") != "repo0,repo1" {
		t.Fatalf("stored repositories: %v %v", repos, err)
	}
	if repos, _ := s.Repositories(ctx); len(repos) != 0 {
		t.Fatalf("repositories with manifests: %v", repos)
	}
	for _, bl := range blobs {
		if bl.Size != 6 || bl.ModTime.IsZero() {
			t.Errorf("blob entry %+v", bl)
		}
	}
}
