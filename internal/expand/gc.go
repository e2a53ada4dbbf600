package expand

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
)

// What garbage collection (package gc) needs of the expansion state. Like
// the store's, the Remove methods remove only records older than the
// cutoff they are given.

// An Expansion is a finished expansion: the layer and its blobs.
type Expansion struct {
	Layer, Index, Data digest.Digest
	ModTime            time.Time
}

// Expansions lists the finished expansions.
func (s *Service) Expansions() ([]Expansion, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, "done"))
	if err != nil {
		return nil, err
	}
	var out []Expansion
	for _, e := range ents {
		d, ok := nameDigest(e.Name())
		if !ok {
			continue
		}
		p := filepath.Join(s.dir, "done", e.Name())
		fi, err := os.Stat(p)
		if err != nil {
			continue
		}
		var md api.MountDescriptor
		if b, err := os.ReadFile(p); err != nil || json.Unmarshal(b, &md) != nil {
			continue
		}
		out = append(out, Expansion{Layer: d, Index: md.Index.Digest, Data: md.Data.Digest, ModTime: fi.ModTime()})
	}
	return out, nil
}

// LayerRecords lists the layers with a queued, failed or started record.
func (s *Service) LayerRecords() []digest.Digest {
	seen := map[digest.Digest]bool{}
	var out []digest.Digest
	for _, kind := range []string{"queue", "failed", "started"} {
		ents, _ := os.ReadDir(filepath.Join(s.dir, kind))
		for _, e := range ents {
			if d, ok := nameDigest(e.Name()); ok && !seen[d] {
				seen[d] = true
				out = append(out, d)
			}
		}
	}
	return out
}

// RemoveLayerRecords removes what the service records of layer d (its
// expansion record, failure, queue entry) if older than cutoff, and
// reports how many records went. The expansion's blobs are the store's.
func (s *Service) RemoveLayerRecords(d digest.Digest, cutoff time.Time) int {
	n := 0
	for _, kind := range []string{"done", "failed", "started", "queue"} {
		p := s.path(kind, d)
		if fi, err := os.Stat(p); err == nil && fi.ModTime().Before(cutoff) && os.Remove(p) == nil {
			n++
		}
	}
	return n
}

// CompressedIndexes lists the index blobs kept compressed for serving.
func (s *Service) CompressedIndexes() []digest.Digest {
	ents, _ := os.ReadDir(filepath.Join(s.dir, "index-zst"))
	var out []digest.Digest
	for _, e := range ents {
		if d, ok := nameDigest(e.Name()); ok {
			out = append(out, d)
		}
	}
	return out
}

// RemoveCompressedIndex removes the compressed copy of index d if older
// than cutoff, and reports the bytes freed.
func (s *Service) RemoveCompressedIndex(d digest.Digest, cutoff time.Time) int64 {
	p := s.path("index-zst", d)
	fi, err := os.Stat(p)
	if err != nil || !fi.ModTime().Before(cutoff) || os.Remove(p) != nil {
		return 0
	}
	return fi.Size()
}

// A ProfileRecord is a stored start-up profile: of manifest Manifest in
// the repository whose ProfileKey is Key, with its pack.
type ProfileRecord struct {
	Key      string
	Manifest digest.Digest
	Pack     digest.Digest // empty: none
	ModTime  time.Time
}

// ProfileKey is the key of repo's profiles in ProfileRecord.
func ProfileKey(repo string) string {
	h := sha256.Sum256([]byte(repo))
	return hex.EncodeToString(h[:16])
}

// ProfileRecords lists the stored start-up profiles.
func (s *Service) ProfileRecords() []ProfileRecord {
	base := filepath.Join(s.dir, "profiles")
	keys, _ := os.ReadDir(base)
	var out []ProfileRecord
	for _, k := range keys {
		ents, _ := os.ReadDir(filepath.Join(base, k.Name()))
		for _, e := range ents {
			m, ok := nameDigest(e.Name())
			if !ok {
				continue // artifact records, temporary files
			}
			p := filepath.Join(base, k.Name(), e.Name())
			fi, err := os.Stat(p)
			if err != nil {
				continue
			}
			r := ProfileRecord{Key: k.Name(), Manifest: m, ModTime: fi.ModTime()}
			var prof api.Profile
			if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &prof) == nil && prof.Pack != nil {
				r.Pack = prof.Pack.Digest
			}
			out = append(out, r)
		}
	}
	return out
}

// RemoveProfile removes a profile record (and its artifact record) if
// older than cutoff.
func (s *Service) RemoveProfile(r ProfileRecord, cutoff time.Time) bool {
	if strings.ContainsAny(r.Key, `/\.`) {
		return false
	}
	p := filepath.Join(s.dir, "profiles", r.Key, recordName(r.Manifest))
	fi, err := os.Stat(p)
	if err != nil || !fi.ModTime().Before(cutoff) {
		return false
	}
	os.Remove(p + ".artifact")
	if os.Remove(p) != nil {
		return false
	}
	os.Remove(filepath.Dir(p)) // the repository's last profile: its directory too
	return true
}
