package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// What garbage collection (package gc) needs of the store. A collector
// runs beside the processes serving the store, so it relies on times:
// every write that makes a blob or link needed again (a push of a blob
// that exists, a mount, a HEAD of a blob, a manifest naming a blob) makes
// the blob and the link young, and the Remove* methods remove only what
// is older than the cutoff they are given, checked again just before.

// OpenShared opens the existing store at root for a process working beside
// the one that serves it: unlike Open it creates nothing and removes none
// of the temporary files (they may be in use).
func OpenShared(root string) (*Store, error) {
	for _, d := range []string{"blobs", "repositories", "tmp", "uploads"} {
		if fi, err := os.Stat(filepath.Join(root, d)); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("%s is not a registry root (no %s/)", root, d)
		}
	}
	return &Store{d: NewFilesystem(root), local: root, uploads: map[string]*upload{}}, nil
}

// An Entry is a blob, link or revision with its modification time.
type Entry struct {
	Digest  digest.Digest
	Size    int64
	ModTime time.Time
}

// digestEntries lists files <dir>/<alg>/<hex> (nested: <dir>/<alg>/<hex[:2]>/<hex>)
// as entries.
func (s *Store) digestEntries(ctx context.Context, dir string, nested bool) ([]Entry, error) {
	files, err := s.d.List(ctx, dir, true)
	if err != nil {
		return nil, err
	}
	depth := 2
	if nested {
		depth = 3
	}
	var out []Entry
	for _, f := range files {
		parts := strings.Split(strings.TrimPrefix(f.Key, dir+"/"), "/")
		if len(parts) != depth || f.Dir {
			continue
		}
		d := digest.Digest(parts[0] + ":" + parts[len(parts)-1])
		if d.Validate() != nil {
			continue
		}
		out = append(out, Entry{Digest: d, Size: f.Size, ModTime: f.ModTime})
	}
	return out, nil
}

// StoredRepositories lists every repository with anything in it: those
// with manifests (Repositories) and those with only blobs (a push that has
// not reached its manifest, or one that never will).
func (s *Store) StoredRepositories(ctx context.Context) ([]string, error) {
	var repos []string
	err := s.walkRepositories(ctx, func(repo string, names map[string]bool) {
		if names["_manifests"] || names["_layers"] {
			repos = append(repos, repo)
		}
	})
	return repos, err
}

// Blobs lists every blob of the store.
func (s *Store) Blobs(ctx context.Context) ([]Entry, error) {
	return s.digestEntries(ctx, "blobs", true)
}

// Links lists the blobs linked into repo.
func (s *Store) Links(ctx context.Context, repo string) ([]Entry, error) {
	return s.digestEntries(ctx, repoKey(repo, "_layers"), false)
}

// Revisions lists the manifests of repo.
func (s *Store) Revisions(ctx context.Context, repo string) ([]Entry, error) {
	return s.digestEntries(ctx, repoKey(repo, "_manifests", "revisions"), false)
}

// References is what a manifest's content names: blobs (config, layers,
// and the blobs of an artifact) and manifests (an index's children), and
// its subject.
type References struct {
	Blobs     []digest.Digest
	Manifests []digest.Digest
	Subject   digest.Digest
	// Foreign are layers with URLs (non-distributable): not expected in
	// the registry.
	Foreign []digest.Digest
}

// ParseReferences returns what manifest content names. Content that is
// not a manifest names nothing.
func ParseReferences(content []byte) References {
	var doc struct {
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
		Blobs     []ocispec.Descriptor `json:"blobs"` // artifact manifests of OCI 1.1 drafts
		Manifests []ocispec.Descriptor `json:"manifests"`
		Subject   *ocispec.Descriptor  `json:"subject"`
	}
	var r References
	if json.Unmarshal(content, &doc) != nil {
		return r
	}
	if doc.Config != nil && doc.Config.Digest.Validate() == nil {
		r.Blobs = append(r.Blobs, doc.Config.Digest)
	}
	for _, l := range append(doc.Layers, doc.Blobs...) {
		switch {
		case l.Digest.Validate() != nil:
		case len(l.URLs) > 0:
			r.Foreign = append(r.Foreign, l.Digest)
		default:
			r.Blobs = append(r.Blobs, l.Digest)
		}
	}
	for _, m := range doc.Manifests {
		if m.Digest.Validate() == nil {
			r.Manifests = append(r.Manifests, m.Digest)
		}
	}
	if doc.Subject != nil && doc.Subject.Digest.Validate() == nil {
		r.Subject = doc.Subject.Digest
	}
	return r
}

// Touch makes blob d and its link in repo young (see package gc): a client
// was just told that repo has it, and may name it in a manifest next.
func (s *Store) Touch(repo string, d digest.Digest) {
	if validDigest(d) != nil {
		return
	}
	ctx := context.Background()
	s.d.Touch(ctx, layerLink(repo, d))
	s.d.Touch(ctx, blobKey(d))
}

// HasManifest reports whether manifest d is in repo.
func (s *Store) HasManifest(repo string, d digest.Digest) bool {
	if validDigest(d) != nil {
		return false
	}
	ok, _ := s.exists(context.Background(), revisionLink(repo, d))
	return ok
}

// older reports whether key exists and was last modified before cutoff.
func (s *Store) older(ctx context.Context, key string, cutoff time.Time) bool {
	fi, err := s.d.Stat(ctx, key)
	return err == nil && fi.ModTime.Before(cutoff)
}

// RemoveLink removes blob d's link from repo if it is older than cutoff.
func (s *Store) RemoveLink(repo string, d digest.Digest, cutoff time.Time) (bool, error) {
	ctx := context.Background()
	p := layerLink(repo, d)
	if validDigest(d) != nil || !s.older(ctx, p, cutoff) {
		return false, nil
	}
	if err := s.d.Delete(ctx, p); err != nil {
		return false, err
	}
	return true, nil
}

// RemoveRevision removes manifest d from repo (its tags and referrers entry
// too, as DeleteManifest does) if its record is older than cutoff.
func (s *Store) RemoveRevision(ctx context.Context, repo string, d digest.Digest, cutoff time.Time) (bool, error) {
	if validDigest(d) != nil || !s.older(ctx, revisionLink(repo, d), cutoff) {
		return false, nil
	}
	if err := s.DeleteManifest(ctx, repo, d); err != nil {
		if errors.Is(err, ErrManifestUnknown) {
			// The revision record is there but the content is not (a
			// crash between the two): the record alone goes.
			return s.d.Delete(ctx, revisionLink(repo, d)) == nil, nil
		}
		return false, err
	}
	return true, nil
}

// RemoveBlob removes blob d from the store if it is older than cutoff and
// reports the bytes freed. The blob is first moved out of sight, then its
// time checked again: a writer that made it young meanwhile (it was pushed
// or mounted again) keeps it.
func (s *Store) RemoveBlob(d digest.Digest, cutoff time.Time) (int64, error) {
	ctx := context.Background()
	p := blobKey(d)
	if validDigest(d) != nil || !s.older(ctx, p, cutoff) {
		return 0, nil
	}
	tmp := path.Join("tmp", "gc-"+d.Encoded())
	if err := s.d.Move(ctx, p, tmp); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	fi, err := s.d.Stat(ctx, tmp)
	if err != nil {
		return 0, err
	}
	if !fi.ModTime.Before(cutoff) {
		// Made young between the check and the move: put it back
		// (unless a writer stored it again meanwhile, which is the same).
		if err := s.d.Move(ctx, tmp, p); err != nil && !errors.Is(err, fs.ErrExist) {
			return 0, err
		}
		return 0, nil
	}
	if err := s.d.Delete(ctx, tmp); err != nil {
		return 0, err
	}
	// Shard directories stay: one is shared by 1/256 of all blobs.
	return fi.Size, nil
}

// RemoveTemp removes temporary files of tmp/ older than cutoff (those of
// processes that died; the ones in use are written to) and reports how
// many and their bytes.
func (s *Store) RemoveTemp(cutoff time.Time) (n int, bytes int64, err error) {
	ctx := context.Background()
	ents, err := s.d.List(ctx, "tmp", false)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range ents {
		if !e.ModTime.Before(cutoff) {
			continue
		}
		if s.d.Delete(ctx, e.Key) == nil {
			n++
			bytes += e.Size
		}
	}
	return n, bytes, nil
}

// RemoveEmptyRepositories removes the records of repositories that hold
// nothing any more (no manifest, link, tag or referrer), so that the
// catalog no longer lists them, and reports how many.
func (s *Store) RemoveEmptyRepositories(ctx context.Context) int {
	repos, err := s.StoredRepositories(ctx)
	if err != nil {
		return 0
	}
	n := 0
	for _, repo := range repos {
		empty := true
		for _, sub := range []string{"_layers", "_manifests", "_referrers"} {
			if files, err := s.d.List(ctx, repoKey(repo, sub), true); err != nil || len(files) > 0 {
				empty = false
			}
		}
		if !empty {
			continue
		}
		for _, sub := range []string{"_layers", "_manifests", "_referrers"} {
			s.d.Delete(ctx, repoKey(repo, sub))
		}
		// The directory goes too, and its parents, unless they hold
		// other repositories.
		if r, ok := s.d.(dirRemover); ok {
			for p := repoKey(repo); p != "repositories" && strings.HasPrefix(p, "repositories/"); p = path.Dir(p) {
				if r.RemoveDir(p) != nil {
					break
				}
			}
		}
		n++
	}
	return n
}
