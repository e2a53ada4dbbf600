// Package store is the registry's storage: a content-addressed blob store on
// the local filesystem, with repositories, tags, upload sessions and the
// referrers index kept beside it as small files.
//
// Every write is atomic: content is written to a temporary file in the same
// filesystem, fsynced, and renamed into place, so a crash or a killed upload
// never leaves a partial blob or a half-written record visible. Blobs are
// immutable once named by their digest; concurrent writers of the same blob
// rename identical bytes over each other, which is harmless.
//
// On-disk layout under the root directory:
//
//	<root>/
//	  blobs/<alg>/<hex[0:2]>/<hex>          blob content, immutable, shared by all repositories
//	  uploads/<id>/data                      bytes received so far for an upload session
//	  uploads/<id>/repo                      the repository the session belongs to
//	  tmp/                                   temporary files, renamed into place or removed
//	  repositories/<name>/                   <name> may contain slashes (library/debian)
//	    _layers/<alg>/<hex>                  link: the blob is part of this repository
//	    _manifests/revisions/<alg>/<hex>     link: the manifest is in this repository; holds
//	                                         its media type and subject as JSON
//	    _manifests/tags/<tag>                the digest the tag points to
//	    _referrers/<alg>/<hex>/<alg>-<hex>   a referrer of subject <alg>:<hex>: the referring
//	                                         manifest's descriptor as JSON
//
// Repository path components always start with a letter or digit, so they
// never collide with the underscore-prefixed directories above.
package store

import (
	"context"
	"crypto/rand"
	_ "crypto/sha256" // digest algorithms the store accepts
	_ "crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/strata-oci/strata/internal/atomicfile"
)

// Sentinel errors. The registry maps them to OCI error codes.
var (
	ErrBlobUnknown     = errors.New("blob unknown")
	ErrManifestUnknown = errors.New("manifest unknown")
	ErrUploadUnknown   = errors.New("upload unknown")
	ErrNameUnknown     = errors.New("repository name unknown")
	ErrDigestInvalid   = errors.New("digest invalid")
	ErrSizeInvalid     = errors.New("size invalid")
	ErrRangeInvalid    = errors.New("range invalid")
)

// Store is a registry store rooted at one directory.
type Store struct {
	root string

	mu      sync.Mutex
	uploads map[string]*upload // sessions seen by this process (hash state, lock)
}

// Open opens (creating if needed) the store at root.
func Open(root string) (*Store, error) {
	for _, d := range []string{"blobs", "uploads", "tmp", "repositories"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
	}
	// Temporary files left by a crash are garbage.
	if ents, err := os.ReadDir(filepath.Join(root, "tmp")); err == nil {
		for _, e := range ents {
			os.RemoveAll(filepath.Join(root, "tmp", e.Name()))
		}
	}
	return &Store{root: root, uploads: map[string]*upload{}}, nil
}

// Root returns the store's root directory.
func (s *Store) Root() string { return s.root }

func (s *Store) blobPath(d digest.Digest) string {
	h := d.Encoded()
	return filepath.Join(s.root, "blobs", string(d.Algorithm()), h[:2], h)
}

func (s *Store) repoPath(repo string, elem ...string) string {
	return filepath.Join(append([]string{s.root, "repositories", filepath.FromSlash(repo)}, elem...)...)
}

func (s *Store) layerLink(repo string, d digest.Digest) string {
	return s.repoPath(repo, "_layers", string(d.Algorithm()), d.Encoded())
}

func (s *Store) revisionLink(repo string, d digest.Digest) string {
	return s.repoPath(repo, "_manifests", "revisions", string(d.Algorithm()), d.Encoded())
}

func (s *Store) tagPath(repo, tag string) string {
	return s.repoPath(repo, "_manifests", "tags", tag)
}

func (s *Store) referrersDir(repo string, subject digest.Digest) string {
	return s.repoPath(repo, "_referrers", string(subject.Algorithm()), subject.Encoded())
}

// validDigest reports whether d is a well-formed digest of a supported algorithm.
func validDigest(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrDigestInvalid, err)
	}
	return nil
}

// writeFileAtomic writes data to path through a temporary file, fsync and rename.
func (s *Store) writeFileAtomic(path string, data []byte) error {
	if err := atomicfile.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Join(s.root, "tmp"), "w-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return s.rename(tmp, path)
}

// rename moves a finished temporary file into place and syncs the directory.
func (s *Store) rename(tmp, path string) error {
	if err := atomicfile.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	atomicfile.SyncDir(filepath.Dir(path))
	return nil
}

// ---- blobs ----

// StatBlob returns the size of blob d in repo.
func (s *Store) StatBlob(ctx context.Context, repo string, d digest.Digest) (int64, error) {
	if err := validDigest(d); err != nil {
		return 0, err
	}
	if _, err := os.Stat(s.layerLink(repo, d)); err != nil {
		return 0, ErrBlobUnknown
	}
	fi, err := os.Stat(s.blobPath(d))
	if err != nil {
		return 0, ErrBlobUnknown
	}
	return fi.Size(), nil
}

// OpenBlob opens blob d of repo for reading.
func (s *Store) OpenBlob(ctx context.Context, repo string, d digest.Digest) (*os.File, error) {
	if err := validDigest(d); err != nil {
		return nil, err
	}
	if _, err := os.Stat(s.layerLink(repo, d)); err != nil {
		return nil, ErrBlobUnknown
	}
	f, err := os.Open(s.blobPath(d))
	if err != nil {
		return nil, ErrBlobUnknown
	}
	return f, nil
}

// DeleteBlob removes blob d from repo. The content stays in the shared blob
// store while other repositories link it.
func (s *Store) DeleteBlob(ctx context.Context, repo string, d digest.Digest) error {
	if err := validDigest(d); err != nil {
		return err
	}
	if err := os.Remove(s.layerLink(repo, d)); err != nil {
		return ErrBlobUnknown
	}
	return nil
}

// HasBlob reports whether the shared blob store holds d, in any repository.
func (s *Store) HasBlob(d digest.Digest) bool {
	if validDigest(d) != nil {
		return false
	}
	_, err := os.Stat(s.blobPath(d))
	return err == nil
}

// MountBlob links blob d, which repository from holds, into repo. With from
// empty, any blob in the store is mounted (anonymous mount).
func (s *Store) MountBlob(ctx context.Context, repo, from string, d digest.Digest) error {
	if err := validDigest(d); err != nil {
		return err
	}
	if from != "" {
		if _, err := os.Stat(s.layerLink(from, d)); err != nil {
			return ErrBlobUnknown
		}
	}
	if !s.HasBlob(d) {
		return ErrBlobUnknown
	}
	return s.link(repo, d)
}

func (s *Store) link(repo string, d digest.Digest) error {
	p := s.layerLink(repo, d)
	if _, err := os.Stat(p); err == nil {
		s.Touch(repo, d) // needed again: young for garbage collection
		return nil
	}
	if err := s.writeFileAtomic(p, []byte(d.String())); err != nil {
		return err
	}
	now := time.Now()
	os.Chtimes(s.blobPath(d), now, now)
	return nil
}

// PutBlob stores the content read from r as blob d of repo, verifying the
// digest (and size, when size >= 0) before anything becomes visible.
func (s *Store) PutBlob(ctx context.Context, repo string, d digest.Digest, size int64, r io.Reader) error {
	if err := validDigest(d); err != nil {
		return err
	}
	if s.HasBlob(d) {
		// Stored already: the bytes sent must still be d's, or anyone
		// could link any blob into a repository by naming its digest.
		v := d.Verifier()
		n, err := io.Copy(v, r)
		if err != nil {
			return err
		}
		if size >= 0 && n != size {
			return fmt.Errorf("%w: got %d bytes, want %d", ErrSizeInvalid, n, size)
		}
		if !v.Verified() {
			return fmt.Errorf("%w: content does not match %s", ErrDigestInvalid, d)
		}
		return s.link(repo, d)
	}
	f, err := os.CreateTemp(filepath.Join(s.root, "tmp"), "blob-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	v := d.Verifier()
	n, err := io.Copy(io.MultiWriter(f, v), r)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if size >= 0 && n != size {
		os.Remove(tmp)
		return fmt.Errorf("%w: got %d bytes, want %d", ErrSizeInvalid, n, size)
	}
	if !v.Verified() {
		os.Remove(tmp)
		return fmt.Errorf("%w: content does not match %s", ErrDigestInvalid, d)
	}
	if err := s.rename(tmp, s.blobPath(d)); err != nil {
		return err
	}
	return s.link(repo, d)
}

// CreateTemp creates a temporary file in the store's filesystem, for a
// writer that will hand it to CommitFile. A crash leaves it in tmp/, which
// Open empties.
func (s *Store) CreateTemp(pattern string) (*os.File, error) {
	return os.CreateTemp(filepath.Join(s.root, "tmp"), pattern)
}

// CommitFile makes the finished temporary file at path (from CreateTemp)
// blob d of repo. The file's content is verified against d first, so a
// caller's mistake can never name a blob wrongly.
func (s *Store) CommitFile(ctx context.Context, repo, path string, d digest.Digest) error {
	if err := validDigest(d); err != nil {
		os.Remove(path)
		return err
	}
	if s.HasBlob(d) {
		os.Remove(path)
		return s.link(repo, d)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	got, err := d.Algorithm().FromReader(f)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		os.Remove(path)
		return err
	}
	if got != d {
		os.Remove(path)
		return fmt.Errorf("%w: file is %s, not %s", ErrDigestInvalid, got, d)
	}
	if err := s.rename(path, s.blobPath(d)); err != nil {
		return err
	}
	return s.link(repo, d)
}

// Link links blob d, which the store holds, into repo.
func (s *Store) Link(ctx context.Context, repo string, d digest.Digest) error {
	return s.MountBlob(ctx, repo, "", d)
}

// ---- repositories ----

// Repositories lists the repositories that hold manifests or blobs, sorted.
func (s *Store) Repositories(ctx context.Context) ([]string, error) {
	base := filepath.Join(s.root, "repositories")
	var repos []string
	err := filepath.WalkDir(base, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if !de.IsDir() || p == base {
			return nil
		}
		if strings.HasPrefix(de.Name(), "_") {
			return fs.SkipDir
		}
		if _, err := os.Stat(filepath.Join(p, "_manifests")); err == nil {
			rel, _ := filepath.Rel(base, p)
			repos = append(repos, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(repos)
	return repos, nil
}

// ---- manifests ----

// Manifest is a stored manifest.
type Manifest struct {
	Digest    digest.Digest
	MediaType string
	Content   []byte
	// Subject is the manifest's subject, if it has one.
	Subject digest.Digest
}

type revision struct {
	MediaType    string            `json:"mediaType"`
	Subject      digest.Digest     `json:"subject,omitempty"`
	ArtifactType string            `json:"artifactType,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
}

// ManifestMeta is what the referrers index needs of a manifest.
type ManifestMeta struct {
	Subject      digest.Digest
	ArtifactType string
	Annotations  map[string]string
}

// PutManifest stores a manifest in repo, records it as a referrer of its
// subject, and points each of tags at it.
func (s *Store) PutManifest(ctx context.Context, repo string, m Manifest, meta ManifestMeta, tags []string) error {
	if err := validDigest(m.Digest); err != nil {
		return err
	}
	if !m.Digest.Algorithm().Available() || m.Digest.Algorithm().FromBytes(m.Content) != m.Digest {
		return fmt.Errorf("%w: manifest content does not match %s", ErrDigestInvalid, m.Digest)
	}
	if !s.HasBlob(m.Digest) {
		if err := s.writeBlobBytes(m.Digest, m.Content); err != nil {
			return err
		}
	}
	if meta.Subject != "" {
		desc := ocispec.Descriptor{
			MediaType:    m.MediaType,
			Digest:       m.Digest,
			Size:         int64(len(m.Content)),
			ArtifactType: meta.ArtifactType,
			Annotations:  meta.Annotations,
		}
		b, err := json.Marshal(desc)
		if err != nil {
			return err
		}
		p := filepath.Join(s.referrersDir(repo, meta.Subject), string(m.Digest.Algorithm())+"-"+m.Digest.Encoded())
		if err := s.writeFileAtomic(p, b); err != nil {
			return err
		}
	}
	rev, err := json.Marshal(revision{MediaType: m.MediaType, Subject: meta.Subject})
	if err != nil {
		return err
	}
	if err := s.writeFileAtomic(s.revisionLink(repo, m.Digest), rev); err != nil {
		return err
	}
	for _, t := range tags {
		if err := s.writeFileAtomic(s.tagPath(repo, t), []byte(m.Digest.String())); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) writeBlobBytes(d digest.Digest, b []byte) error {
	f, err := os.CreateTemp(filepath.Join(s.root, "tmp"), "blob-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return s.rename(tmp, s.blobPath(d))
}

// Resolve returns the digest a tag points to.
func (s *Store) Resolve(ctx context.Context, repo, tag string) (digest.Digest, error) {
	b, err := os.ReadFile(s.tagPath(repo, tag))
	if err != nil {
		return "", ErrManifestUnknown
	}
	d := digest.Digest(strings.TrimSpace(string(b)))
	if d.Validate() != nil {
		return "", ErrManifestUnknown
	}
	return d, nil
}

// GetManifest returns the manifest d of repo.
func (s *Store) GetManifest(ctx context.Context, repo string, d digest.Digest) (Manifest, error) {
	if err := validDigest(d); err != nil {
		return Manifest{}, err
	}
	rb, err := os.ReadFile(s.revisionLink(repo, d))
	if err != nil {
		return Manifest{}, ErrManifestUnknown
	}
	var rev revision
	if err := json.Unmarshal(rb, &rev); err != nil {
		return Manifest{}, fmt.Errorf("manifest %s: corrupt revision record: %w", d, err)
	}
	content, err := os.ReadFile(s.blobPath(d))
	if err != nil {
		return Manifest{}, ErrManifestUnknown
	}
	return Manifest{Digest: d, MediaType: rev.MediaType, Content: content, Subject: rev.Subject}, nil
}

// DeleteManifest removes manifest d from repo, with every tag that points to
// it and its entry in the referrers index.
func (s *Store) DeleteManifest(ctx context.Context, repo string, d digest.Digest) error {
	m, err := s.GetManifest(ctx, repo, d)
	if err != nil {
		return err
	}
	if err := os.Remove(s.revisionLink(repo, d)); err != nil {
		return ErrManifestUnknown
	}
	tags, _ := s.Tags(ctx, repo)
	for _, t := range tags {
		if td, err := s.Resolve(ctx, repo, t); err == nil && td == d {
			os.Remove(s.tagPath(repo, t))
		}
	}
	if m.Subject != "" {
		os.Remove(filepath.Join(s.referrersDir(repo, m.Subject), string(d.Algorithm())+"-"+d.Encoded()))
	}
	return nil
}

// Tag points tag at manifest d, which must be in repo.
func (s *Store) Tag(ctx context.Context, repo, tag string, d digest.Digest) error {
	if _, err := os.Stat(s.revisionLink(repo, d)); err != nil {
		return ErrManifestUnknown
	}
	return s.writeFileAtomic(s.tagPath(repo, tag), []byte(d.String()))
}

// Untag removes a tag; the manifest stays.
func (s *Store) Untag(ctx context.Context, repo, tag string) error {
	if err := os.Remove(s.tagPath(repo, tag)); err != nil {
		return ErrManifestUnknown
	}
	return nil
}

// Tags lists the tags of repo in lexical order. A repository that never held
// anything is ErrNameUnknown.
func (s *Store) Tags(ctx context.Context, repo string) ([]string, error) {
	if _, err := os.Stat(s.repoPath(repo)); err != nil {
		return nil, ErrNameUnknown
	}
	ents, err := os.ReadDir(s.repoPath(repo, "_manifests", "tags"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	tags := make([]string, 0, len(ents))
	for _, e := range ents {
		tags = append(tags, e.Name())
	}
	sort.Strings(tags)
	return tags, nil
}

// Referrers lists the descriptors of the manifests in repo whose subject is d,
// in a stable order.
func (s *Store) Referrers(ctx context.Context, repo string, subject digest.Digest) ([]ocispec.Descriptor, error) {
	if err := validDigest(subject); err != nil {
		return nil, err
	}
	dir := s.referrersDir(repo, subject)
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	var out []ocispec.Descriptor
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var desc ocispec.Descriptor
		if json.Unmarshal(b, &desc) != nil {
			continue
		}
		// The referrer may have been removed from the repository by a
		// concurrent delete; list only what is still there.
		if _, err := os.Stat(s.revisionLink(repo, desc.Digest)); err != nil {
			continue
		}
		out = append(out, desc)
	}
	return out, nil
}

// ---- uploads ----

type upload struct {
	mu   sync.Mutex
	size int64
	// sha256 state of the bytes so far, valid while hashed == size.
	hash   digestHasher
	hashed int64
}

type digestHasher interface {
	io.Writer
	Sum([]byte) []byte
}

func newUploadID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (s *Store) uploadDir(id string) string { return filepath.Join(s.root, "uploads", id) }

func validUploadID(id string) bool {
	if len(id) != 32 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil
}

// UploadExists reports whether upload session id is open.
func (s *Store) UploadExists(id string) bool {
	if !validUploadID(id) {
		return false
	}
	_, err := os.Stat(s.uploadDir(id))
	return err == nil
}

// NewUpload starts an upload session for repo and returns its id.
func (s *Store) NewUpload(ctx context.Context, repo string) (string, error) {
	id := newUploadID()
	dir := s.uploadDir(id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "repo"), []byte(repo), 0o644); err != nil {
		return "", err
	}
	f, err := os.OpenFile(filepath.Join(dir, "data"), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return "", err
	}
	f.Close()
	s.mu.Lock()
	s.uploads[id] = &upload{hash: digest.SHA256.Hash()}
	s.mu.Unlock()
	return id, nil
}

// session finds upload id of repo and returns it locked.
func (s *Store) session(repo, id string) (*upload, error) {
	if !validUploadID(id) {
		return nil, ErrUploadUnknown
	}
	b, err := os.ReadFile(filepath.Join(s.uploadDir(id), "repo"))
	if err != nil || string(b) != repo {
		return nil, ErrUploadUnknown
	}
	s.mu.Lock()
	u, ok := s.uploads[id]
	if !ok {
		// A session from before a restart: no hash state, recompute at commit.
		u = &upload{hashed: -1}
		s.uploads[id] = u
	}
	s.mu.Unlock()
	u.mu.Lock()
	fi, err := os.Stat(filepath.Join(s.uploadDir(id), "data"))
	if err != nil {
		u.mu.Unlock()
		return nil, ErrUploadUnknown
	}
	u.size = fi.Size()
	return u, nil
}

// UploadStatus returns how many bytes upload id has received.
func (s *Store) UploadStatus(ctx context.Context, repo, id string) (int64, error) {
	u, err := s.session(repo, id)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	return u.size, nil
}

// AppendUpload appends r to upload id. start is where the chunk begins in
// the blob (-1 for a streamed chunk without Content-Range); it must equal the
// bytes received so far. length, when >= 0, is the chunk's declared length.
// It returns the upload's new size.
func (s *Store) AppendUpload(ctx context.Context, repo, id string, start, length int64, r io.Reader) (int64, error) {
	u, err := s.session(repo, id)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	if start >= 0 && start != u.size {
		return u.size, fmt.Errorf("%w: chunk starts at %d, upload has %d bytes", ErrRangeInvalid, start, u.size)
	}
	f, err := os.OpenFile(filepath.Join(s.uploadDir(id), "data"), os.O_WRONLY, 0)
	if err != nil {
		return u.size, ErrUploadUnknown
	}
	defer f.Close()
	if _, err := f.Seek(u.size, io.SeekStart); err != nil {
		return u.size, err
	}
	var w io.Writer = f
	if u.hash != nil && u.hashed == u.size {
		w = io.MultiWriter(f, u.hash)
	} else {
		u.hash = nil
	}
	src := r
	if length >= 0 {
		src = io.LimitReader(r, length)
	}
	n, err := io.Copy(w, src)
	if u.hash != nil {
		u.hashed += n
	}
	if err != nil {
		// Keep what was written consistent with the hash state: cut back.
		f.Truncate(u.size)
		if u.hash != nil {
			u.hash, u.hashed = nil, -1
		}
		return u.size, fmt.Errorf("upload %s: %w", id, err)
	}
	if length >= 0 && n != length {
		f.Truncate(u.size)
		u.hash, u.hashed = nil, -1
		return u.size, fmt.Errorf("%w: chunk has %d bytes, Content-Length says %d", ErrSizeInvalid, n, length)
	}
	u.size += n
	return u.size, nil
}

// CommitUpload verifies that upload id's bytes have digest d and, if so,
// makes them blob d of repo and ends the session. On a mismatch nothing is
// committed and the session is removed.
func (s *Store) CommitUpload(ctx context.Context, repo, id string, d digest.Digest) (int64, error) {
	if err := validDigest(d); err != nil {
		return 0, err
	}
	u, err := s.session(repo, id)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	dir := s.uploadDir(id)
	data := filepath.Join(dir, "data")
	var got digest.Digest
	if d.Algorithm() == digest.SHA256 && u.hash != nil && u.hashed == u.size {
		got = digest.NewDigestFromBytes(digest.SHA256, u.hash.Sum(nil))
	} else {
		f, err := os.Open(data)
		if err != nil {
			return 0, ErrUploadUnknown
		}
		got, err = d.Algorithm().FromReader(f)
		f.Close()
		if err != nil {
			return 0, err
		}
	}
	defer s.forget(id)
	if got != d {
		os.RemoveAll(dir)
		return 0, fmt.Errorf("%w: uploaded content is %s, not %s", ErrDigestInvalid, got, d)
	}
	if s.HasBlob(d) {
		os.RemoveAll(dir)
	} else {
		f, err := os.Open(data)
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err != nil {
			return 0, err
		}
		// Move the data out of the session first so the session directory
		// never holds a committed blob.
		tmp := filepath.Join(s.root, "tmp", "commit-"+id)
		if err := os.Rename(data, tmp); err != nil {
			return 0, err
		}
		os.RemoveAll(dir)
		if err := s.rename(tmp, s.blobPath(d)); err != nil {
			return 0, err
		}
	}
	if err := s.link(repo, d); err != nil {
		return 0, err
	}
	return u.size, nil
}

func (s *Store) forget(id string) {
	s.mu.Lock()
	delete(s.uploads, id)
	s.mu.Unlock()
}

// CancelUpload ends upload id, discarding its bytes.
func (s *Store) CancelUpload(ctx context.Context, repo, id string) error {
	u, err := s.session(repo, id)
	if err != nil {
		return err
	}
	defer u.mu.Unlock()
	defer s.forget(id)
	return os.RemoveAll(s.uploadDir(id))
}

// PurgeUploads removes upload sessions not written to for longer than maxAge
// and returns how many it removed.
func (s *Store) PurgeUploads(ctx context.Context, maxAge time.Duration) (int, error) {
	ents, err := os.ReadDir(filepath.Join(s.root, "uploads"))
	if err != nil {
		return 0, err
	}
	n := 0
	cutoff := time.Now().Add(-maxAge)
	for _, e := range ents {
		dir := s.uploadDir(e.Name())
		fi, err := os.Stat(filepath.Join(dir, "data"))
		if err == nil && fi.ModTime().After(cutoff) {
			continue
		}
		if err != nil {
			// A session directory without data: look at the directory itself.
			if di, derr := os.Stat(dir); derr == nil && di.ModTime().After(cutoff) {
				continue
			}
		}
		s.mu.Lock()
		u := s.uploads[e.Name()]
		s.mu.Unlock()
		if u != nil {
			u.mu.Lock()
		}
		os.RemoveAll(dir)
		s.forget(e.Name())
		if u != nil {
			u.mu.Unlock()
		}
		n++
	}
	return n, nil
}
