package publish

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// ExpandOptions shape Expand.
type ExpandOptions struct {
	// Platforms selects the manifests of an index (nil: every platform).
	Platforms []ocispec.Platform
	// TempDir holds the expansions while they are pushed (default
	// os.TempDir()).
	TempDir string
	// Progress, if set, is told of each step.
	Progress func(Event)
	Logger   *slog.Logger
}

// An Event is a step of Expand on one layer.
type Event struct {
	Manifest digest.Digest
	Layer    digest.Digest
	// Step is one of the Step constants.
	Step string
	// Done and Total are bytes: of the layer read while expanding, or of
	// the expansion pushed.
	Done, Total int64
	// Err is why a layer cannot be expanded (StepInvalid).
	Err error
}

// Steps of an Event.
const (
	StepAlready   = "already expanded"
	StepExpanding = "expanding"
	StepPushing   = "pushing"
	StepPushed    = "pushed"
	StepInvalid   = "cannot be expanded"
)

// Summary is what Expand did.
type Summary struct {
	// Manifests is the number of image manifests expanded.
	Manifests int
	// Expanded, Already and Invalid count distinct layers: expanded and
	// pushed now, expanded there before, that cannot be expanded.
	Expanded, Already, Invalid int
	// IndexBytes and DataBytes are the sizes of the blobs pushed.
	IndexBytes, DataBytes int64
	// Artifacts is the number of expansion artifacts pushed (one per
	// manifest whose artifact changed).
	Artifacts int
	// ReferrersTag: the registry has no Referrers API; the artifacts are
	// listed by the referrers tag schema's index.
	ReferrersTag bool
}

// maxArtifactsRead bounds the expansion artifacts of one manifest that
// Expand reads (it keeps one per manifest).
const maxArtifactsRead = 8

// Expand expands the layers of the image reference (a tag or digest)
// names in r, every platform of an index unless opts choose, exactly as
// strata's registry does, and pushes each layer's index and data blobs
// and, per image manifest, an expansion artifact referring to it. Layers
// an artifact there lists already (with both blobs present) are not
// expanded again. Each artifact is pushed after all its blobs.
func Expand(ctx context.Context, r *Repo, reference string, opts ExpandOptions) (*Summary, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Progress == nil {
		opts.Progress = func(Event) {}
	}
	top, err := r.Resolve(ctx, reference)
	if err != nil {
		return nil, err
	}
	manifests, err := r.imageManifests(ctx, top, opts.Platforms)
	if err != nil {
		return nil, err
	}
	if len(manifests) == 0 {
		return nil, fmt.Errorf("%s:%s has no image manifest for the platforms asked", r, reference)
	}
	e := &expander{r: r, opts: opts, sum: &Summary{}, done: map[digest.Digest]api.LayerExpansion{}, seen: map[digest.Digest]bool{}}
	for _, m := range manifests {
		if err := e.manifest(ctx, m); err != nil {
			return e.sum, err
		}
	}
	e.sum.ReferrersTag = r.ReferrersTag(ctx, manifests[0].desc.Digest)
	return e.sum, nil
}

type imageManifest struct {
	desc ocispec.Descriptor
	man  ocispec.Manifest
}

// imageManifests returns the image manifests top is or lists, of the
// platforms asked (all when none is). Attestations and other artifacts in
// an index are skipped.
func (r *Repo) imageManifests(ctx context.Context, top ocispec.Descriptor, want []ocispec.Platform) ([]imageManifest, error) {
	raw, err := r.ReadManifest(ctx, top)
	if err != nil {
		return nil, err
	}
	var doc struct {
		MediaType string               `json:"mediaType"`
		Manifests []ocispec.Descriptor `json:"manifests"`
		Config    *ocispec.Descriptor  `json:"config"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Errorf("manifest %s of %s: %w", top.Digest, r, err)
	}
	if doc.Config != nil {
		var m ocispec.Manifest
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, fmt.Errorf("manifest %s of %s: %w", top.Digest, r, err)
		}
		if !api.IsImageConfig(m.Config.MediaType) {
			return nil, fmt.Errorf("%s@%s is not a container image (config %s)", r, top.Digest, m.Config.MediaType)
		}
		top.MediaType = cmpOr(m.MediaType, top.MediaType)
		return []imageManifest{{desc: top, man: m}}, nil
	}
	var out []imageManifest
	for _, d := range doc.Manifests {
		if d.Platform == nil || d.Platform.OS == "unknown" || d.ArtifactType != "" {
			continue // attestations, signatures
		}
		if len(want) > 0 && !slices.ContainsFunc(want, func(p ocispec.Platform) bool { return platforms.NewMatcher(p).Match(*d.Platform) }) {
			continue
		}
		if d.MediaType != ocispec.MediaTypeImageManifest && d.MediaType != remote.MediaTypeDockerManifest {
			continue // a nested index
		}
		sub, err := r.imageManifests(ctx, d, nil)
		if err != nil {
			return nil, err
		}
		out = append(out, sub...)
	}
	return out, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

type expander struct {
	r    *Repo
	opts ExpandOptions
	sum  *Summary
	// done: the expansions made or found in this run, by layer; seen: the
	// layers counted in the summary.
	done map[digest.Digest]api.LayerExpansion
	seen map[digest.Digest]bool
}

// manifest expands the layers of image manifest m that no artifact lists
// yet and pushes its artifact.
func (e *expander) manifest(ctx context.Context, m imageManifest) error {
	e.sum.Manifests++
	existing, err := e.existing(ctx, m.desc)
	if err != nil {
		return err
	}
	var exps []api.LayerExpansion
	for _, l := range m.man.Layers {
		if !api.Expandable(l.MediaType) {
			continue
		}
		x, ok := existing.layers[l.Digest]
		if !ok {
			x, ok = e.done[l.Digest]
		}
		if ok {
			if !e.seen[l.Digest] {
				e.seen[l.Digest] = true
				e.sum.Already++
				e.opts.Progress(Event{Manifest: m.desc.Digest, Layer: l.Digest, Step: StepAlready})
			}
			exps = append(exps, x)
			continue
		}
		if e.seen[l.Digest] {
			continue // could not be expanded
		}
		e.seen[l.Digest] = true
		x, err := e.layer(ctx, m.desc.Digest, l)
		if errors.Is(err, layerindex.ErrInvalidLayer) {
			e.sum.Invalid++
			e.opts.Progress(Event{Manifest: m.desc.Digest, Layer: l.Digest, Step: StepInvalid, Err: err})
			continue
		}
		if err != nil {
			return err
		}
		e.sum.Expanded++
		e.done[l.Digest] = x
		exps = append(exps, x)
	}
	if len(exps) == 0 {
		return nil
	}
	art, err := api.ExpansionArtifact(m.desc, exps)
	if err != nil {
		return err
	}
	if existing.artifacts[digest.FromBytes(art)] {
		return nil
	}
	if _, err := e.r.PushArtifact(ctx, art); err != nil {
		return err
	}
	e.sum.Artifacts++
	return nil
}

type existingExpansions struct {
	layers    map[digest.Digest]api.LayerExpansion
	artifacts map[digest.Digest]bool
}

// existing reads the expansion artifacts that refer to manifest m and
// returns the expansions they list whose blobs are there.
func (e *expander) existing(ctx context.Context, m ocispec.Descriptor) (existingExpansions, error) {
	out := existingExpansions{layers: map[digest.Digest]api.LayerExpansion{}, artifacts: map[digest.Digest]bool{}}
	descs, err := e.r.Referrers(ctx, m, api.ArtifactTypeExpansion)
	if err != nil {
		return out, err
	}
	for i, d := range descs {
		if i == maxArtifactsRead {
			break
		}
		raw, err := e.r.ReadManifest(ctx, d)
		if err != nil {
			e.opts.Logger.Warn("expansion artifact cannot be read", "artifact", d.Digest, "err", err)
			continue
		}
		exps, err := api.ParseExpansionArtifact(raw, m.Digest)
		if err != nil {
			e.opts.Logger.Warn("expansion artifact refused", "artifact", d.Digest, "err", err)
			continue
		}
		out.artifacts[d.Digest] = true
		for l, x := range exps {
			if _, ok := out.layers[l]; ok {
				continue
			}
			hasIndex, err := e.r.HasBlob(ctx, x.Index)
			if err != nil {
				return out, err
			}
			hasData, err := e.r.HasBlob(ctx, x.Data)
			if err != nil {
				return out, err
			}
			if hasIndex && hasData {
				out.layers[l] = x
			}
		}
	}
	return out, nil
}

// layer expands layer l of manifest m and pushes its blobs.
func (e *expander) layer(ctx context.Context, m digest.Digest, l ocispec.Descriptor) (api.LayerExpansion, error) {
	x := api.LayerExpansion{Layer: l.Digest}
	rc, err := e.r.FetchBlob(ctx, l)
	if err != nil {
		return x, err
	}
	defer rc.Close()
	data, err := os.CreateTemp(e.opts.TempDir, "strata-expand-data-")
	if err != nil {
		return x, err
	}
	defer os.Remove(data.Name())
	defer data.Close()
	in := &progressReader{r: rc, ev: Event{Manifest: m, Layer: l.Digest, Step: StepExpanding, Total: l.Size}, report: e.opts.Progress}
	dataDigester := digest.Canonical.Digester()
	dataCount := &counter{}
	ix, err := layerindex.Build(ctx, in, io.MultiWriter(data, dataDigester.Hash(), dataCount), layerindex.Options{})
	if err != nil {
		return x, fmt.Errorf("expand layer %s of %s: %w", l.Digest, e.r, err)
	}
	if ix.Layer != l.Digest {
		// The registry served other bytes than the layer's.
		return x, fmt.Errorf("layer %s of %s: the registry's blob hashes to %s", l.Digest, e.r, ix.Layer)
	}
	idx, err := os.CreateTemp(e.opts.TempDir, "strata-expand-index-")
	if err != nil {
		return x, err
	}
	defer os.Remove(idx.Name())
	defer idx.Close()
	idxDigester := digest.Canonical.Digester()
	idxCount := &counter{}
	if err := ix.Encode(io.MultiWriter(idx, idxDigester.Hash(), idxCount)); err != nil {
		return x, fmt.Errorf("expand layer %s: encode index: %w", l.Digest, err)
	}
	for _, f := range []*os.File{data, idx} {
		if err := f.Close(); err != nil {
			return x, err
		}
	}
	x.Index = ocispec.Descriptor{MediaType: api.MediaTypeIndex, Digest: idxDigester.Digest(), Size: idxCount.n}
	x.Data = ocispec.Descriptor{MediaType: api.MediaTypeData, Digest: dataDigester.Digest(), Size: dataCount.n}
	total := x.Index.Size + x.Data.Size
	e.opts.Progress(Event{Manifest: m, Layer: l.Digest, Step: StepPushing, Total: total})
	// Data first: an index is only useful with its data.
	pushedData, err := e.r.PushFile(ctx, x.Data, data.Name())
	if err != nil {
		return x, err
	}
	pushedIndex, err := e.r.PushFile(ctx, x.Index, idx.Name())
	if err != nil {
		return x, err
	}
	if pushedData {
		e.sum.DataBytes += x.Data.Size
	}
	if pushedIndex {
		e.sum.IndexBytes += x.Index.Size
	}
	e.opts.Progress(Event{Manifest: m, Layer: l.Digest, Step: StepPushed, Done: total, Total: total})
	return x, nil
}

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// progressReader reports the bytes read, at most every 4 MiB.
type progressReader struct {
	r      io.Reader
	ev     Event
	last   int64
	report func(Event)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.ev.Done += int64(n)
	if p.ev.Done-p.last >= 4<<20 || (err == io.EOF && p.ev.Done != p.last) {
		p.last = p.ev.Done
		p.report(p.ev)
	}
	return n, err
}
