// Package store is the registry's storage: a content-addressed blob store,
// with repositories, tags, upload sessions and the referrers index kept
// beside it as small files, on a Driver: one directory of the local
// filesystem (Open), or a bucket of an S3-compatible object store (package
// s3store), with the same layout as keys.
//
// Every write is atomic: on the filesystem, content is written to a
// temporary file in the same filesystem, fsynced, and renamed into place;
// on an object store an object appears whole when its upload completes. So
// a crash or a killed upload never leaves a partial blob or a half-written
// record visible. Blobs are immutable once named by their digest and
// verified before they are named; concurrent writers of the same blob
// store identical bytes over each other, which is harmless.
//
// Layout under the root directory (or the bucket's prefix):
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
//
// On an object store an upload session's data is a multipart upload, its
// state kept beside it (uploads/<id>/data.upload, data.tail-<n>: see
// s3store), and the session keeps its sha256 state too
// (uploads/<id>/hashstate, at the size it covers), so that a session
// continued by another process is verified at commit without reading its
// bytes again. The filesystem keeps the layout above exactly: a session
// continued after a restart is hashed again from its data file.
package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	_ "crypto/sha512" // digest algorithms the store accepts
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
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
	// ErrUnavailable: the storage failed to answer (an object store's
	// network error, 5xx or throttling). The request may be retried.
	ErrUnavailable = errors.New("storage unavailable")
)

// Store is a registry store on one driver.
type Store struct {
	d Driver
	// local is a directory of the local filesystem: the root of a
	// filesystem store; for another driver the directory of temporary
	// files (CreateTemp) and of state that is kept locally (Root).
	local string
	// persistHash: keep upload sessions' sha256 state beside them.
	persistHash bool
	redirect    bool

	mu      sync.Mutex
	uploads map[string]*upload // sessions seen by this process (hash state, lock)
}

// Open opens (creating if needed) the store at root, on the filesystem.
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
	return &Store{d: NewFilesystem(root), local: root, uploads: map[string]*upload{}}, nil
}

// Options are the options of a store on a driver other than the
// filesystem (OpenDriver).
type Options struct {
	// LocalDir is a local directory for temporary files (CreateTemp:
	// expansions in progress) and what is kept locally (Root: expansion
	// state). Made if needed.
	LocalDir string
	// Redirect lets BlobURL answer with the driver's URLs of blobs (an
	// object store's presigned GETs).
	Redirect bool
}

// OpenDriver opens the store kept by driver d (an object store's: see
// package s3store). Temporary files left in opts.LocalDir's tmp/ by a
// crash are removed; those of the driver are not (other processes may be
// writing them).
func OpenDriver(d Driver, opts Options) (*Store, error) {
	if opts.LocalDir == "" {
		return nil, errors.New("open store: no local directory")
	}
	tmp := filepath.Join(opts.LocalDir, "tmp")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	if ents, err := os.ReadDir(tmp); err == nil {
		for _, e := range ents {
			os.RemoveAll(filepath.Join(tmp, e.Name()))
		}
	}
	_, isFS := d.(*Filesystem)
	return &Store{d: d, local: opts.LocalDir, persistHash: !isFS, redirect: opts.Redirect, uploads: map[string]*upload{}}, nil
}

// Root returns the store's root directory: on the filesystem, where
// everything is; on another driver, the local directory of its options.
func (s *Store) Root() string { return s.local }

// Driver returns the driver the store is kept by.
func (s *Store) Driver() Driver { return s.d }

func blobKey(d digest.Digest) string {
	h := d.Encoded()
	return path.Join("blobs", string(d.Algorithm()), h[:2], h)
}

func repoKey(repo string, elem ...string) string {
	return path.Join(append([]string{"repositories", repo}, elem...)...)
}

func layerLink(repo string, d digest.Digest) string {
	return repoKey(repo, "_layers", string(d.Algorithm()), d.Encoded())
}

func revisionLink(repo string, d digest.Digest) string {
	return repoKey(repo, "_manifests", "revisions", string(d.Algorithm()), d.Encoded())
}

func tagKey(repo, tag string) string {
	return repoKey(repo, "_manifests", "tags", tag)
}

func referrersDir(repo string, subject digest.Digest) string {
	return repoKey(repo, "_referrers", string(subject.Algorithm()), subject.Encoded())
}

func referrerKey(repo string, subject, d digest.Digest) string {
	return path.Join(referrersDir(repo, subject), string(d.Algorithm())+"-"+d.Encoded())
}

// validDigest reports whether d is a well-formed digest of a supported algorithm.
func validDigest(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrDigestInvalid, err)
	}
	return nil
}

// unknown is err as what a reader of the store is told: an unavailable
// storage as such, anything else (a file that is not there) as sentinel.
func unknown(err, sentinel error) error {
	if errors.Is(err, ErrUnavailable) {
		return err
	}
	return sentinel
}

func (s *Store) exists(ctx context.Context, key string) (bool, error) {
	_, err := s.d.Stat(ctx, key)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, ErrUnavailable) {
		return false, err
	}
	return false, nil
}

// ---- blobs ----

// StatBlob returns the size of blob d in repo.
func (s *Store) StatBlob(ctx context.Context, repo string, d digest.Digest) (int64, error) {
	if err := validDigest(d); err != nil {
		return 0, err
	}
	if _, err := s.d.Stat(ctx, layerLink(repo, d)); err != nil {
		return 0, unknown(err, ErrBlobUnknown)
	}
	fi, err := s.d.Stat(ctx, blobKey(d))
	if err != nil {
		return 0, unknown(err, ErrBlobUnknown)
	}
	return fi.Size, nil
}

// OpenBlob opens blob d of repo for reading (on the filesystem, an
// *os.File).
func (s *Store) OpenBlob(ctx context.Context, repo string, d digest.Digest) (Reader, error) {
	if err := validDigest(d); err != nil {
		return nil, err
	}
	if _, err := s.d.Stat(ctx, layerLink(repo, d)); err != nil {
		return nil, unknown(err, ErrBlobUnknown)
	}
	f, err := s.d.Open(ctx, blobKey(d))
	if err != nil {
		return nil, unknown(err, ErrBlobUnknown)
	}
	return f, nil
}

// BlobURL returns a URL that serves blob d of repo without the registry
// in between, valid for a while (an object store's presigned GET), or ""
// when the store gives none: the driver has none, or the store was not
// opened with Options.Redirect.
func (s *Store) BlobURL(ctx context.Context, repo string, d digest.Digest) (string, error) {
	r, ok := s.d.(redirector)
	if !ok || !s.redirect {
		return "", nil
	}
	if err := validDigest(d); err != nil {
		return "", err
	}
	if _, err := s.d.Stat(ctx, layerLink(repo, d)); err != nil {
		return "", unknown(err, ErrBlobUnknown)
	}
	return r.URL(ctx, blobKey(d))
}

// DeleteBlob removes blob d from repo. The content stays in the shared blob
// store while other repositories link it.
func (s *Store) DeleteBlob(ctx context.Context, repo string, d digest.Digest) error {
	if err := validDigest(d); err != nil {
		return err
	}
	if err := s.d.Delete(ctx, layerLink(repo, d)); err != nil {
		return unknown(err, ErrBlobUnknown)
	}
	return nil
}

// HasBlob reports whether the shared blob store holds d, in any repository.
func (s *Store) HasBlob(d digest.Digest) bool {
	ok, _ := s.hasBlob(context.Background(), d)
	return ok
}

func (s *Store) hasBlob(ctx context.Context, d digest.Digest) (bool, error) {
	if validDigest(d) != nil {
		return false, nil
	}
	return s.exists(ctx, blobKey(d))
}

// MountBlob links blob d, which repository from holds, into repo. With from
// empty, any blob in the store is mounted (anonymous mount).
func (s *Store) MountBlob(ctx context.Context, repo, from string, d digest.Digest) error {
	if err := validDigest(d); err != nil {
		return err
	}
	if from != "" {
		if _, err := s.d.Stat(ctx, layerLink(from, d)); err != nil {
			return unknown(err, ErrBlobUnknown)
		}
	}
	if ok, err := s.hasBlob(ctx, d); err != nil {
		return err
	} else if !ok {
		return ErrBlobUnknown
	}
	return s.link(ctx, repo, d)
}

func (s *Store) link(ctx context.Context, repo string, d digest.Digest) error {
	p := layerLink(repo, d)
	if ok, err := s.exists(ctx, p); err != nil {
		return err
	} else if ok {
		s.Touch(repo, d) // needed again: young for garbage collection
		return nil
	}
	if err := s.d.Put(ctx, p, []byte(d.String())); err != nil {
		return err
	}
	s.d.Touch(ctx, blobKey(d))
	return nil
}

// PutBlob stores the content read from r as blob d of repo, verifying the
// digest (and size, when size >= 0) before anything becomes visible.
func (s *Store) PutBlob(ctx context.Context, repo string, d digest.Digest, size int64, r io.Reader) error {
	if err := validDigest(d); err != nil {
		return err
	}
	has, err := s.hasBlob(ctx, d)
	if err != nil {
		return err
	}
	if has {
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
		return s.link(ctx, repo, d)
	}
	w, err := s.d.Create(ctx, blobKey(d))
	if err != nil {
		return err
	}
	v := d.Verifier()
	n, err := io.Copy(io.MultiWriter(w, v), r)
	if err != nil {
		w.Close()
		return err
	}
	if size >= 0 && n != size {
		w.Close()
		return fmt.Errorf("%w: got %d bytes, want %d", ErrSizeInvalid, n, size)
	}
	if !v.Verified() {
		w.Close()
		return fmt.Errorf("%w: content does not match %s", ErrDigestInvalid, d)
	}
	if err := w.Commit(ctx); err != nil {
		return err
	}
	return s.link(ctx, repo, d)
}

// CreateTemp creates a temporary file in the store's local directory, for
// a writer that will hand it to CommitFile. A crash leaves it in tmp/,
// which Open empties.
func (s *Store) CreateTemp(pattern string) (*os.File, error) {
	return os.CreateTemp(filepath.Join(s.local, "tmp"), pattern)
}

// CommitFile makes the finished temporary file at path (from CreateTemp)
// blob d of repo. The file's content is verified against d first, so a
// caller's mistake can never name a blob wrongly. The file is gone
// afterwards, whatever the outcome.
func (s *Store) CommitFile(ctx context.Context, repo, path string, d digest.Digest) error {
	if err := validDigest(d); err != nil {
		os.Remove(path)
		return err
	}
	has, err := s.hasBlob(ctx, d)
	if err != nil {
		os.Remove(path)
		return err
	}
	if has {
		os.Remove(path)
		return s.link(ctx, repo, d)
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
	if m, ok := s.d.(fileMover); ok {
		if err := m.MoveFile(ctx, path, blobKey(d)); err != nil {
			return err
		}
	} else if err := s.copyFile(ctx, path, blobKey(d)); err != nil {
		return err
	}
	return s.link(ctx, repo, d)
}

// copyFile stores the local file at path as key and removes it.
func (s *Store) copyFile(ctx context.Context, path, key string) error {
	defer os.Remove(path)
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	w, err := s.d.Create(ctx, key)
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, f); err != nil {
		w.Close()
		return err
	}
	return w.Commit(ctx)
}

// Link links blob d, which the store holds, into repo.
func (s *Store) Link(ctx context.Context, repo string, d digest.Digest) error {
	return s.MountBlob(ctx, repo, "", d)
}

// ---- repositories ----

// walkRepositories calls fn for each directory below repositories/ that
// can be a repository (not an underscore one), in lexical order, with its
// name and the names in it.
func (s *Store) walkRepositories(ctx context.Context, fn func(repo string, names map[string]bool)) error {
	// walk visits the directories of listing ents (of one directory),
	// listing each once.
	var walk func(ents []FileInfo) error
	walk = func(ents []FileInfo) error {
		sort.Slice(ents, func(i, j int) bool { return ents[i].Key < ents[j].Key })
		for _, e := range ents {
			name := path.Base(e.Key)
			if !e.Dir || strings.HasPrefix(name, "_") {
				continue
			}
			sub, err := s.d.List(ctx, e.Key, false)
			if err != nil {
				return err
			}
			names := map[string]bool{}
			for _, c := range sub {
				names[path.Base(c.Key)] = true
			}
			fn(strings.TrimPrefix(e.Key, "repositories/"), names)
			if err := walk(sub); err != nil {
				return err
			}
		}
		return nil
	}
	top, err := s.d.List(ctx, "repositories", false)
	if err != nil {
		return err
	}
	return walk(top)
}

// Repositories lists the repositories that hold manifests or blobs, sorted.
func (s *Store) Repositories(ctx context.Context) ([]string, error) {
	var repos []string
	err := s.walkRepositories(ctx, func(repo string, names map[string]bool) {
		if names["_manifests"] {
			repos = append(repos, repo)
		}
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
	if has, err := s.hasBlob(ctx, m.Digest); err != nil {
		return err
	} else if !has {
		if err := s.d.Put(ctx, blobKey(m.Digest), m.Content); err != nil {
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
		if err := s.d.Put(ctx, referrerKey(repo, meta.Subject, m.Digest), b); err != nil {
			return err
		}
	}
	rev, err := json.Marshal(revision{MediaType: m.MediaType, Subject: meta.Subject})
	if err != nil {
		return err
	}
	if err := s.d.Put(ctx, revisionLink(repo, m.Digest), rev); err != nil {
		return err
	}
	for _, t := range tags {
		if err := s.d.Put(ctx, tagKey(repo, t), []byte(m.Digest.String())); err != nil {
			return err
		}
	}
	return nil
}

// Resolve returns the digest a tag points to.
func (s *Store) Resolve(ctx context.Context, repo, tag string) (digest.Digest, error) {
	b, err := s.d.Get(ctx, tagKey(repo, tag))
	if err != nil {
		return "", unknown(err, ErrManifestUnknown)
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
	rb, err := s.d.Get(ctx, revisionLink(repo, d))
	if err != nil {
		return Manifest{}, unknown(err, ErrManifestUnknown)
	}
	var rev revision
	if err := json.Unmarshal(rb, &rev); err != nil {
		return Manifest{}, fmt.Errorf("manifest %s: corrupt revision record: %w", d, err)
	}
	content, err := s.d.Get(ctx, blobKey(d))
	if err != nil {
		return Manifest{}, unknown(err, ErrManifestUnknown)
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
	if err := s.d.Delete(ctx, revisionLink(repo, d)); err != nil {
		return unknown(err, ErrManifestUnknown)
	}
	tags, _ := s.Tags(ctx, repo)
	for _, t := range tags {
		if td, err := s.Resolve(ctx, repo, t); err == nil && td == d {
			s.d.Delete(ctx, tagKey(repo, t))
		}
	}
	if m.Subject != "" {
		s.d.Delete(ctx, referrerKey(repo, m.Subject, d))
	}
	return nil
}

// Tag points tag at manifest d, which must be in repo.
func (s *Store) Tag(ctx context.Context, repo, tag string, d digest.Digest) error {
	if _, err := s.d.Stat(ctx, revisionLink(repo, d)); err != nil {
		return unknown(err, ErrManifestUnknown)
	}
	return s.d.Put(ctx, tagKey(repo, tag), []byte(d.String()))
}

// Untag removes a tag; the manifest stays.
func (s *Store) Untag(ctx context.Context, repo, tag string) error {
	if err := s.d.Delete(ctx, tagKey(repo, tag)); err != nil {
		return unknown(err, ErrManifestUnknown)
	}
	return nil
}

// Tags lists the tags of repo in lexical order. A repository that never held
// anything is ErrNameUnknown.
func (s *Store) Tags(ctx context.Context, repo string) ([]string, error) {
	if _, err := s.d.Stat(ctx, repoKey(repo)); err != nil {
		return nil, unknown(err, ErrNameUnknown)
	}
	ents, err := s.d.List(ctx, repoKey(repo, "_manifests", "tags"), false)
	if err != nil {
		return nil, err
	}
	tags := make([]string, 0, len(ents))
	for _, e := range ents {
		tags = append(tags, path.Base(e.Key))
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
	ents, err := s.d.List(ctx, referrersDir(repo, subject), false)
	if err != nil {
		return nil, err
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Key < ents[j].Key })
	var out []ocispec.Descriptor
	for _, e := range ents {
		b, err := s.d.Get(ctx, e.Key)
		if err != nil {
			if errors.Is(err, ErrUnavailable) {
				return nil, err
			}
			continue
		}
		var desc ocispec.Descriptor
		if json.Unmarshal(b, &desc) != nil {
			continue
		}
		// The referrer may have been removed from the repository by a
		// concurrent delete; list only what is still there.
		if ok, err := s.exists(ctx, revisionLink(repo, desc.Digest)); err != nil {
			return nil, err
		} else if !ok {
			continue
		}
		out = append(out, desc)
	}
	return out, nil
}

// ---- uploads ----

type upload struct {
	mu sync.Mutex
	// sha256 state of the bytes so far, valid while hashed is the
	// session's size.
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

func uploadDir(id string) string       { return path.Join("uploads", id) }
func uploadData(id string) string      { return path.Join("uploads", id, "data") }
func uploadHashState(id string) string { return path.Join("uploads", id, "hashstate") }

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
	ok, _ := s.exists(context.Background(), uploadDir(id))
	return ok
}

// NewUpload starts an upload session for repo and returns its id.
func (s *Store) NewUpload(ctx context.Context, repo string) (string, error) {
	id := newUploadID()
	if err := s.d.Put(ctx, path.Join(uploadDir(id), "repo"), []byte(repo)); err != nil {
		return "", err
	}
	w, err := s.d.Append(ctx, uploadData(id), true)
	if err != nil {
		return "", err
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	s.mu.Lock()
	s.uploads[id] = &upload{hash: sha256.New()}
	s.mu.Unlock()
	return id, nil
}

// session finds upload id of repo and returns it locked.
func (s *Store) session(ctx context.Context, repo, id string) (*upload, error) {
	if !validUploadID(id) {
		return nil, ErrUploadUnknown
	}
	b, err := s.d.Get(ctx, path.Join(uploadDir(id), "repo"))
	if err != nil {
		return nil, unknown(err, ErrUploadUnknown)
	}
	if string(b) != repo {
		return nil, ErrUploadUnknown
	}
	s.mu.Lock()
	u, ok := s.uploads[id]
	if !ok {
		// A session from before a restart, or of another process: no
		// hash state, unless it was kept (loadHash).
		u = &upload{hashed: -1}
		s.uploads[id] = u
	}
	s.mu.Unlock()
	u.mu.Lock()
	return u, nil
}

// data opens the session's data for appending.
func (s *Store) data(ctx context.Context, id string) (Writer, error) {
	w, err := s.d.Append(ctx, uploadData(id), false)
	if err != nil {
		return nil, unknown(err, ErrUploadUnknown)
	}
	return w, nil
}

// hashState is an upload session's sha256 state, kept beside it.
type hashState struct {
	Offset int64  `json:"offset"`
	State  []byte `json:"state"`
}

// loadHash gives u the sha256 state kept beside session id, if there is
// one at size.
func (s *Store) loadHash(ctx context.Context, id string, u *upload, size int64) {
	if !s.persistHash || (u.hash != nil && u.hashed == size) {
		return
	}
	b, err := s.d.Get(ctx, uploadHashState(id))
	if err != nil {
		return
	}
	var hs hashState
	if json.Unmarshal(b, &hs) != nil || hs.Offset != size {
		return
	}
	h := sha256.New()
	if h.(encoding.BinaryUnmarshaler).UnmarshalBinary(hs.State) != nil {
		return
	}
	u.hash, u.hashed = h, size
}

// saveHash keeps u's sha256 state beside session id.
func (s *Store) saveHash(ctx context.Context, id string, u *upload) {
	if !s.persistHash || u.hash == nil {
		return
	}
	m, ok := u.hash.(encoding.BinaryMarshaler)
	if !ok {
		return
	}
	st, err := m.MarshalBinary()
	if err != nil {
		return
	}
	b, _ := json.Marshal(hashState{Offset: u.hashed, State: st})
	s.d.Put(ctx, uploadHashState(id), b) // without it, commit reads the bytes again
}

// UploadStatus returns how many bytes upload id has received.
func (s *Store) UploadStatus(ctx context.Context, repo, id string) (int64, error) {
	u, err := s.session(ctx, repo, id)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	w, err := s.data(ctx, id)
	if err != nil {
		return 0, err
	}
	size := w.Size()
	w.Close()
	return size, nil
}

// AppendUpload appends r to upload id. start is where the chunk begins in
// the blob (-1 for a streamed chunk without Content-Range); it must equal the
// bytes received so far. length, when >= 0, is the chunk's declared length.
// It returns the upload's new size.
func (s *Store) AppendUpload(ctx context.Context, repo, id string, start, length int64, r io.Reader) (int64, error) {
	u, err := s.session(ctx, repo, id)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	w, err := s.data(ctx, id)
	if err != nil {
		return 0, err
	}
	size := w.Size()
	if start >= 0 && start != size {
		w.Close()
		return size, fmt.Errorf("%w: chunk starts at %d, upload has %d bytes", ErrRangeInvalid, start, size)
	}
	s.loadHash(ctx, id, u, size)
	var dst io.Writer = w
	if u.hash != nil && u.hashed == size {
		dst = io.MultiWriter(w, u.hash)
	} else {
		u.hash = nil
	}
	src := r
	if length >= 0 {
		src = io.LimitReader(r, length)
	}
	n, err := io.Copy(dst, src)
	if u.hash != nil {
		u.hashed += n
	}
	if err != nil {
		// Keep what was written consistent with the hash state: cut back.
		w.Cancel(ctx)
		u.hash, u.hashed = nil, -1
		return size, fmt.Errorf("upload %s: %w", id, err)
	}
	if length >= 0 && n != length {
		w.Cancel(ctx)
		u.hash, u.hashed = nil, -1
		return size, fmt.Errorf("%w: chunk has %d bytes, Content-Length says %d", ErrSizeInvalid, n, length)
	}
	if err := w.Close(); err != nil {
		u.hash, u.hashed = nil, -1
		return size, fmt.Errorf("upload %s: %w", id, err)
	}
	s.saveHash(ctx, id, u)
	return size + n, nil
}

// CommitUpload verifies that upload id's bytes have digest d and, if so,
// makes them blob d of repo and ends the session. On a mismatch nothing is
// committed and the session is removed.
func (s *Store) CommitUpload(ctx context.Context, repo, id string, d digest.Digest) (int64, error) {
	if err := validDigest(d); err != nil {
		return 0, err
	}
	u, err := s.session(ctx, repo, id)
	if err != nil {
		return 0, err
	}
	defer u.mu.Unlock()
	w, err := s.data(ctx, id)
	if err != nil {
		return 0, err
	}
	size := w.Size()
	s.loadHash(ctx, id, u, size)
	// The data is readable (and on the filesystem, synced) once
	// committed; it becomes the blob only when verified.
	if err := w.Commit(ctx); err != nil {
		return 0, err
	}
	data := uploadData(id)
	var got digest.Digest
	if d.Algorithm() == digest.SHA256 && u.hash != nil && u.hashed == size {
		got = digest.NewDigestFromBytes(digest.SHA256, u.hash.Sum(nil))
	} else {
		// No hash state (a session continued after a restart) or
		// another algorithm: the bytes are read again.
		f, err := s.d.Open(ctx, data)
		if err != nil {
			return 0, unknown(err, ErrUploadUnknown)
		}
		got, err = d.Algorithm().FromReader(f)
		f.Close()
		if err != nil {
			return 0, err
		}
	}
	defer s.forget(id)
	if got != d {
		s.d.Delete(ctx, uploadDir(id))
		return 0, fmt.Errorf("%w: uploaded content is %s, not %s", ErrDigestInvalid, got, d)
	}
	has, err := s.hasBlob(ctx, d)
	if err != nil {
		return 0, err
	}
	if has {
		s.d.Delete(ctx, uploadDir(id))
	} else {
		// The data leaves the session before the session goes, so that
		// a crash in between leaves the blob stored (verified) and the
		// session without data (unknown, purged later).
		if err := s.d.Move(ctx, data, blobKey(d)); err != nil {
			return 0, err
		}
		s.d.Delete(ctx, uploadDir(id))
	}
	if err := s.link(ctx, repo, d); err != nil {
		return 0, err
	}
	return size, nil
}

func (s *Store) forget(id string) {
	s.mu.Lock()
	delete(s.uploads, id)
	s.mu.Unlock()
}

// CancelUpload ends upload id, discarding its bytes.
func (s *Store) CancelUpload(ctx context.Context, repo, id string) error {
	u, err := s.session(ctx, repo, id)
	if err != nil {
		return err
	}
	defer u.mu.Unlock()
	defer s.forget(id)
	if err := s.d.Delete(ctx, uploadDir(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// PurgeUploads removes upload sessions not written to for longer than maxAge
// and returns how many it removed.
func (s *Store) PurgeUploads(ctx context.Context, maxAge time.Duration) (int, error) {
	ents, err := s.d.List(ctx, "uploads", false)
	if err != nil {
		return 0, err
	}
	n := 0
	cutoff := time.Now().Add(-maxAge)
	for _, e := range ents {
		id := path.Base(e.Key)
		fi, err := s.d.Stat(ctx, uploadData(id))
		if err == nil && fi.ModTime.After(cutoff) {
			continue
		}
		if err != nil {
			// A session without data (on an object store, one whose
			// data is not complete): look at the session itself.
			if di, derr := s.d.Stat(ctx, uploadDir(id)); derr == nil && di.ModTime.After(cutoff) {
				continue
			} else if errors.Is(derr, ErrUnavailable) {
				return n, derr
			}
		}
		s.mu.Lock()
		u := s.uploads[id]
		s.mu.Unlock()
		if u != nil {
			u.mu.Lock()
		}
		// (An object store may list a prefix that holds nothing any
		// more: there is nothing to remove then.)
		err = s.d.Delete(ctx, uploadDir(id))
		s.forget(id)
		if u != nil {
			u.mu.Unlock()
		}
		if err == nil {
			n++
		}
	}
	return n, nil
}
