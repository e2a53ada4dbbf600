package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/publish"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/startup"
)

// Download is the progress of one fallback layer download.
type Download struct {
	Layer digest.Digest `json:"layer"`
	Done  int64         `json:"done"`
	Total int64         `json:"total"`
}

func (m *Manager) setProgress(d digest.Digest, done, total int64) {
	m.mu.Lock()
	m.downloads[d] = &Download{Layer: d, Done: done, Total: total}
	m.mu.Unlock()
}

func (m *Manager) endProgress(d digest.Digest) {
	m.mu.Lock()
	delete(m.downloads, d)
	m.mu.Unlock()
}

// Downloads returns the fallback downloads in progress.
func (m *Manager) Downloads() []Download {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Download, 0, len(m.downloads))
	for _, d := range m.downloads {
		out = append(out, *d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Layer < out[j].Layer })
	return out
}

// Image is a pulled image as the node records it.
type Image struct {
	Ref      string               `json:"ref"`
	Digest   digest.Digest        `json:"digest"`
	Registry string               `json:"registry"`
	Repo     string               `json:"repo"`
	Config   ocispec.Image        `json:"config"`
	Layers   []ocispec.Descriptor `json:"layers"` // bottom first, as in the manifest
	Mode     string               `json:"mode"`
	Pulled   time.Time            `json:"pulled"`
	// Reason says why the fallback was taken.
	Reason string `json:"reason,omitempty"`
	// Source is where the expansions of the lazy layers come from:
	// SourceMountAPI or SourceReferrers ("" with no lazy layer; images
	// recorded before it was kept used the layer-mount API).
	Source string `json:"source,omitempty"`
	// Profile is the image's start-up profile from the registry, if it
	// has one; Unprofiled records that the registry has none (so the
	// first container records one).
	Profile    *api.Profile `json:"profile,omitempty"`
	Unprofiled bool         `json:"unprofiled,omitempty"`
	// PlainHTTP: the image was pulled over plain HTTP (--plain-http).
	PlainHTTP bool `json:"plainHTTP,omitempty"`
	// Refused lists the lazy layers whose expansion failed the node's
	// background verification (verify.go): the next use of the image
	// pulls it again, and those layers whole.
	Refused []digest.Digest `json:"refused,omitempty"`
}

// Images lists pulled images.
func (m *Manager) Images() ([]*Image, error) {
	paths, _ := filepath.Glob(filepath.Join(m.root, "images", "*.json"))
	var out []*Image
	for _, p := range paths {
		var img Image
		if b, err := os.ReadFile(p); err == nil && json.Unmarshal(b, &img) == nil {
			out = append(out, &img)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// image returns the recorded image for ref, pulling it if needed.
func (m *Manager) image(ctx context.Context, ref string) (*Image, error) {
	if r, err := remote.ParseReference(ref); err == nil {
		if b, err := os.ReadFile(imagePath(m.root, r.String())); err == nil {
			var img Image
			if json.Unmarshal(b, &img) == nil && !m.mustRepull(&img) {
				m.reachAsPulled(&img)
				return &img, nil
			}
		}
	}
	return m.Pull(ctx, ref)
}

// mustRepull reports whether img has a layer refused by verification that
// has not been pulled whole since.
func (m *Manager) mustRepull(img *Image) bool {
	for _, d := range img.Refused {
		if _, err := os.Stat(filepath.Join(layerDir(m.root, d), "unpacked")); err != nil {
			return true
		}
	}
	return false
}

// markRefused records in the images that name layer d that its
// expansion failed verification (Image.Refused).
func (m *Manager) markRefused(d digest.Digest, reason string) {
	paths, _ := filepath.Glob(filepath.Join(m.root, "images", "*.json"))
	for _, p := range paths {
		var img Image
		b, err := os.ReadFile(p)
		if err != nil || json.Unmarshal(b, &img) != nil || slices.Contains(img.Refused, d) ||
			!slices.ContainsFunc(img.Layers, func(l ocispec.Descriptor) bool { return l.Digest == d }) {
			continue
		}
		img.Refused = append(img.Refused, d)
		img.Reason = fmt.Sprintf("layer %s: %s: %s", d, errRefused, reason)
		b, _ = json.MarshalIndent(&img, "", "  ")
		if err := atomicfile.Write(p, b); err != nil {
			m.log.Error("marking an image with a refused layer", "ref", img.Ref, "err", err)
		}
	}
}

// reachAsPulled marks the registry of img as reached over plain HTTP if img
// was pulled that way (--plain-http, perhaps before the node restarted):
// its layers' frames come from there.
func (m *Manager) reachAsPulled(img *Image) {
	if img.PlainHTTP {
		m.client.Hosts().AllowPlainHTTP(img.Registry)
	}
}

// RemoveImage forgets a pulled image and frees what only it used: its
// layers that no other image, lease or mount uses, and their cache items.
func (m *Manager) RemoveImage(ctx context.Context, ref string) (*GCReport, error) {
	r, err := remote.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	for _, l := range m.leases {
		if l.Ref == r.String() {
			m.mu.Unlock()
			return nil, fmt.Errorf("image %s is in use by %s", ref, l.ID)
		}
	}
	m.mu.Unlock()
	p := imagePath(m.root, r.String())
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("image %s: not pulled", ref)
	}
	var img Image
	json.Unmarshal(b, &img)
	if err := os.Remove(p); err != nil {
		return nil, err
	}
	layers := make([]digest.Digest, 0, len(img.Layers))
	for _, l := range img.Layers {
		layers = append(layers, l.Digest)
	}
	return m.collect(ctx, layers)
}

// pushProfile stores profile p of the image of t, from a registry without
// strata's routes, as a profile artifact referring to its manifest
// (startup.Options.PushReferrer), with the node's credentials for it.
func (m *Manager) pushProfile(ctx context.Context, t startup.Target, p *api.Profile) error {
	repo, err := publish.Open(t.Repo, publish.Options{Hosts: m.client.Hosts(), Credentials: m.client.Credentials()})
	if err != nil {
		return err
	}
	subject, err := repo.Resolve(ctx, t.Manifest.String())
	if err != nil {
		return err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	_, err = repo.PushProfile(ctx, subject, b)
	return err
}

// profileStored records profile p, just stored in the registry, with the
// image of t: the next container of the image on this node uses it too
// (startup.Options.Stored).
func (m *Manager) profileStored(t startup.Target, p *api.Profile) {
	path := imagePath(m.root, t.Ref)
	b, err := os.ReadFile(path)
	var img Image
	if err != nil || json.Unmarshal(b, &img) != nil || img.Digest != t.Manifest {
		return
	}
	img.Profile, img.Unprofiled = p, false
	b, _ = json.MarshalIndent(&img, "", "  ")
	atomicfile.Write(path, b)
}
