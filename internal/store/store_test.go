package store_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/store"
)

func open(t *testing.T) (*store.Store, string) {
	t.Helper()
	root := t.TempDir()
	s, err := store.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	return s, root
}

// blobFiles lists every file under blobs/.
func blobFiles(t *testing.T, root string) []string {
	t.Helper()
	var files []string
	filepath.Walk(filepath.Join(root, "blobs"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			files = append(files, p)
		}
		return nil
	})
	return files
}

func TestUploadCommitAndMismatch(t *testing.T) {
	ctx := context.Background()
	s, root := open(t)
	data := []byte("hello, blob")
	d := digest.FromBytes(data)

	id, err := s.NewUpload(ctx, "a/b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.AppendUpload(ctx, "a/b", id, 0, 5, bytes.NewReader(data[:5])); err != nil {
		t.Fatal(err)
	}
	// Out of order: starts past the end.
	if _, err := s.AppendUpload(ctx, "a/b", id, 7, 4, bytes.NewReader(data[7:])); !errors.Is(err, store.ErrRangeInvalid) {
		t.Fatalf("out-of-order chunk: err = %v, want ErrRangeInvalid", err)
	}
	// Another repository cannot use the session.
	if _, err := s.UploadStatus(ctx, "other", id); !errors.Is(err, store.ErrUploadUnknown) {
		t.Fatalf("session from another repo: err = %v", err)
	}
	// Nothing is visible before the commit.
	if len(blobFiles(t, root)) != 0 {
		t.Fatal("a blob is visible before commit")
	}
	if _, err := s.AppendUpload(ctx, "a/b", id, -1, -1, bytes.NewReader(data[5:])); err != nil {
		t.Fatal(err)
	}
	if n, err := s.CommitUpload(ctx, "a/b", id, d); err != nil || n != int64(len(data)) {
		t.Fatalf("commit: n=%d err=%v", n, err)
	}
	if n, err := s.StatBlob(ctx, "a/b", d); err != nil || n != int64(len(data)) {
		t.Fatalf("stat: %d %v", n, err)
	}
	if _, err := s.StatBlob(ctx, "c", d); !errors.Is(err, store.ErrBlobUnknown) {
		t.Fatalf("blob visible in a repository it was not pushed to: %v", err)
	}

	// A mismatching digest commits nothing and ends the session.
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
}

func TestSHA512AndRestartedSession(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s, _ := store.Open(root)
	data := bytes.Repeat([]byte{7}, 5000)
	id, _ := s.NewUpload(ctx, "r")
	s.AppendUpload(ctx, "r", id, 0, 2000, bytes.NewReader(data[:2000]))
	// A new process (no in-memory hash state) continues the session.
	s2, err := store.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := s2.UploadStatus(ctx, "r", id); err != nil || n != 2000 {
		t.Fatalf("status after restart: %d %v", n, err)
	}
	s2.AppendUpload(ctx, "r", id, 2000, 3000, bytes.NewReader(data[2000:]))
	d := digest.SHA512.FromBytes(data)
	if _, err := s2.CommitUpload(ctx, "r", id, d); err != nil {
		t.Fatal(err)
	}
	if n, err := s2.StatBlob(ctx, "r", d); err != nil || n != 5000 {
		t.Fatalf("sha512 blob: %d %v", n, err)
	}
}

func TestConcurrentPushesOfOneBlob(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	data := bytes.Repeat([]byte("x"), 1<<20)
	d := digest.FromBytes(data)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
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
	f, err := s.OpenBlob(ctx, "ra", d)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, _ := digest.FromReader(f)
	if got != d {
		t.Fatalf("blob content is %s after concurrent pushes", got)
	}
}

func TestPutBlobRefusesBadContent(t *testing.T) {
	ctx := context.Background()
	s, root := open(t)
	d := digest.FromString("expected")
	if err := s.PutBlob(ctx, "r", d, -1, strings.NewReader("actual")); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("err = %v", err)
	}
	if err := s.PutBlob(ctx, "r", digest.FromString("abc"), 10, strings.NewReader("abc")); !errors.Is(err, store.ErrSizeInvalid) {
		t.Fatalf("size mismatch err = %v", err)
	}
	if n := len(blobFiles(t, root)); n != 0 {
		t.Fatalf("%d blob files after refused pushes", n)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "tmp")); len(ents) != 0 {
		t.Fatalf("temporary files left: %v", ents)
	}
}

func TestOpenRemovesLeftoverTemporaries(t *testing.T) {
	root := t.TempDir()
	if _, err := store.Open(root); err != nil {
		t.Fatal(err)
	}
	// What a crash mid-write leaves behind.
	os.WriteFile(filepath.Join(root, "tmp", "blob-123"), []byte("partial"), 0o644)
	if _, err := store.Open(root); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "tmp")); len(ents) != 0 {
		t.Fatalf("leftover temporary files survive a restart: %v", ents)
	}
}

func TestPurgeUploads(t *testing.T) {
	ctx := context.Background()
	s, root := open(t)
	old, _ := s.NewUpload(ctx, "r")
	fresh, _ := s.NewUpload(ctx, "r")
	past := time.Now().Add(-48 * time.Hour)
	os.Chtimes(filepath.Join(root, "uploads", old, "data"), past, past)
	n, err := s.PurgeUploads(ctx, 24*time.Hour)
	if err != nil || n != 1 {
		t.Fatalf("purged %d, err %v; want 1", n, err)
	}
	if _, err := s.UploadStatus(ctx, "r", old); !errors.Is(err, store.ErrUploadUnknown) {
		t.Fatalf("stale session survives: %v", err)
	}
	if _, err := s.UploadStatus(ctx, "r", fresh); err != nil {
		t.Fatalf("fresh session purged: %v", err)
	}
}

func TestManifestsTagsReferrers(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	subject := []byte(`{"schemaVersion":2}`)
	sd := digest.FromBytes(subject)
	if err := s.PutManifest(ctx, "r", store.Manifest{Digest: sd, MediaType: "application/vnd.oci.image.manifest.v1+json", Content: subject}, store.ManifestMeta{}, []string{"latest", "v1"}); err != nil {
		t.Fatal(err)
	}
	ref := []byte(`{"schemaVersion":2,"subject":"x"}`)
	rd := digest.FromBytes(ref)
	meta := store.ManifestMeta{Subject: sd, ArtifactType: "application/example", Annotations: map[string]string{"k": "v"}}
	if err := s.PutManifest(ctx, "r", store.Manifest{Digest: rd, MediaType: "application/vnd.oci.image.manifest.v1+json", Content: ref}, meta, nil); err != nil {
		t.Fatal(err)
	}
	refs, err := s.Referrers(ctx, "r", sd)
	if err != nil || len(refs) != 1 || refs[0].Digest != rd || refs[0].ArtifactType != "application/example" || refs[0].Annotations["k"] != "v" {
		t.Fatalf("referrers = %+v, %v", refs, err)
	}
	if err := s.PutManifest(ctx, "r", store.Manifest{Digest: digest.FromString("nope"), MediaType: "x", Content: ref}, store.ManifestMeta{}, nil); !errors.Is(err, store.ErrDigestInvalid) {
		t.Fatalf("content/digest mismatch accepted: %v", err)
	}
	tags, _ := s.Tags(ctx, "r")
	if strings.Join(tags, ",") != "latest,v1" {
		t.Fatalf("tags = %v", tags)
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
	repos, _ := s.Repositories(ctx)
	if strings.Join(repos, ",") != "r" {
		t.Fatalf("repositories = %v", repos)
	}
}

// TestNewDirectoriesSynced: a blob stored under a shard directory that did
// not exist, linked into a repository that did not exist, is durable only
// if the new directories' entries are synced too.
func TestNewDirectoriesSynced(t *testing.T) {
	s, root := open(t)
	var mu sync.Mutex
	synced := map[string]bool{}
	old := atomicfile.SyncDir
	atomicfile.SyncDir = func(dir string) { mu.Lock(); synced[dir] = true; mu.Unlock(); old(dir) }
	t.Cleanup(func() { atomicfile.SyncDir = old })
	b := []byte("a blob in a new shard")
	d := digest.FromBytes(b)
	if err := s.PutBlob(context.Background(), "new/repo", d, int64(len(b)), bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, dir := range []string{
		filepath.Join(root, "blobs", "sha256"),                  // holds the new shard
		filepath.Join(root, "blobs", "sha256", d.Encoded()[:2]), // holds the blob
		filepath.Join(root, "repositories"),                     // holds the new repository
		filepath.Join(root, "repositories", "new"),
	} {
		if !synced[dir] {
			t.Errorf("%s not synced", dir)
		}
	}
}
