package api

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Artifacts that travel as OCI referrers of an image manifest (their
// subject), so that any registry with the Referrers API, or the referrers
// tag schema of distribution-spec v1.1, can carry them:
//
//   - the expansion artifact (ArtifactTypeExpansion) lists, for layers of
//     the image, the index and data blobs of their expansion (descriptors
//     annotated with AnnotationLayer and AnnotationRole). strata's registry
//     publishes one when it has expanded every layer of a manifest;
//     `strata expand` pushes one to any registry.
//   - the profile artifact (ArtifactTypeProfile) holds the image's start-up
//     profile (one layer of MediaTypeProfile, the Profile JSON) and, when
//     it has one, its pack (one layer of MediaTypePack).
//
// The artifacts are OCI image manifests with the empty config, the form
// the image spec recommends for artifacts.
const (
	ArtifactTypeExpansion = "application/vnd.strata.expansion.v1"
	ArtifactTypeProfile   = "application/vnd.strata.profile.v1"
	MediaTypeProfile      = "application/vnd.strata.profile.v1+json"
	MediaTypePack         = "application/vnd.strata.pack.v1+zstd"
	// MediaTypeIndex and MediaTypeData are the expanded layer's blobs
	// (the format is the Go package layerindex, docs/format.md).
	MediaTypeIndex = "application/vnd.strata.layer.index.v1"
	MediaTypeData  = "application/vnd.strata.layer.data.v1+zstd"
)

// Expandable reports whether a layer of this media type is expanded: the
// tar layers of an image, uncompressed, gzip or zstd, OCI or Docker.
// Encrypted and non-distributable layers are not.
func Expandable(mediaType string) bool {
	switch mediaType {
	case ocispec.MediaTypeImageLayer, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd,
		"application/vnd.docker.image.rootfs.diff.tar.gzip",
		"application/vnd.docker.image.rootfs.diff.tar",
		"application/vnd.docker.image.rootfs.diff.tar.zstd":
		return true
	}
	return false
}

// IsImageConfig reports whether a manifest whose config has this media
// type is a container image (and not an artifact).
func IsImageConfig(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageConfig || mediaType == "application/vnd.docker.container.image.v1+json"
}

// LayerExpansion names the expansion of one layer: its index and data
// blobs.
type LayerExpansion struct {
	Layer digest.Digest
	Index ocispec.Descriptor
	Data  ocispec.Descriptor
}

// MaxArtifactLayers bounds the layers an artifact may list (an image has
// at most a few hundred; each expanded layer is two).
const MaxArtifactLayers = 2048

// ExpansionArtifact returns the expansion artifact of the image manifest
// subject for layers, in the order given. The same arguments give the same
// bytes, whoever makes it.
func ExpansionArtifact(subject ocispec.Descriptor, layers []LayerExpansion) ([]byte, error) {
	if 2*len(layers) > MaxArtifactLayers {
		return nil, fmt.Errorf("expansion artifact: %d layers, more than %d", len(layers), MaxArtifactLayers/2)
	}
	descs := make([]ocispec.Descriptor, 0, 2*len(layers))
	for _, l := range layers {
		idx := ocispec.Descriptor{MediaType: MediaTypeIndex, Digest: l.Index.Digest, Size: l.Index.Size,
			Annotations: map[string]string{AnnotationLayer: l.Layer.String(), AnnotationRole: "index"}}
		data := ocispec.Descriptor{MediaType: MediaTypeData, Digest: l.Data.Digest, Size: l.Data.Size,
			Annotations: map[string]string{AnnotationLayer: l.Layer.String(), AnnotationRole: "data"}}
		descs = append(descs, idx, data)
	}
	return artifact(ArtifactTypeExpansion, subject, descs)
}

// ProfileArtifact returns the profile artifact of the image manifest
// subject: the profile blob, and the pack blob when there is one.
func ProfileArtifact(subject, profile ocispec.Descriptor, pack *ocispec.Descriptor) ([]byte, error) {
	descs := []ocispec.Descriptor{{MediaType: MediaTypeProfile, Digest: profile.Digest, Size: profile.Size}}
	if pack != nil {
		descs = append(descs, ocispec.Descriptor{MediaType: MediaTypePack, Digest: pack.Digest, Size: pack.Size})
	}
	return artifact(ArtifactTypeProfile, subject, descs)
}

func artifact(artifactType string, subject ocispec.Descriptor, layers []ocispec.Descriptor) ([]byte, error) {
	empty := ocispec.DescriptorEmptyJSON
	m := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: artifactType,
		Config:       ocispec.Descriptor{MediaType: empty.MediaType, Digest: empty.Digest, Size: empty.Size},
		Layers:       layers,
		Subject:      &ocispec.Descriptor{MediaType: subject.MediaType, Digest: subject.Digest, Size: subject.Size},
	}
	return json.Marshal(m)
}

// ParseExpansionArtifact reads an expansion artifact whose subject must be
// the manifest subject, and returns the expansions it lists by layer. It
// checks the form only; what a node uses it checks against the image (the
// index names its layer, diff ID and data blob).
func ParseExpansionArtifact(raw []byte, subject digest.Digest) (map[digest.Digest]LayerExpansion, error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("expansion artifact: %w", err)
	}
	switch {
	case m.ArtifactType != ArtifactTypeExpansion:
		return nil, fmt.Errorf("expansion artifact: artifact type is %q", m.ArtifactType)
	case m.Subject == nil || m.Subject.Digest != subject:
		return nil, fmt.Errorf("expansion artifact: its subject is not %s", subject)
	case len(m.Layers) > MaxArtifactLayers:
		return nil, fmt.Errorf("expansion artifact: %d blobs, more than %d", len(m.Layers), MaxArtifactLayers)
	}
	out := make(map[digest.Digest]LayerExpansion)
	for _, d := range m.Layers {
		l, err := digest.Parse(d.Annotations[AnnotationLayer])
		if err != nil {
			return nil, fmt.Errorf("expansion artifact: blob %s: layer annotation: %w", d.Digest, err)
		}
		if err := d.Digest.Validate(); err != nil || d.Size < 0 {
			return nil, fmt.Errorf("expansion artifact: bad descriptor for layer %s", l)
		}
		e := out[l]
		e.Layer = l
		switch role := d.Annotations[AnnotationRole]; {
		case role == "index" && d.MediaType == MediaTypeIndex:
			e.Index = d
		case role == "data" && d.MediaType == MediaTypeData:
			e.Data = d
		default:
			return nil, fmt.Errorf("expansion artifact: blob %s of layer %s: role %q, media type %q", d.Digest, l, role, d.MediaType)
		}
		out[l] = e
	}
	for l, e := range out {
		if e.Index.Digest == "" || e.Data.Digest == "" {
			return nil, fmt.Errorf("expansion artifact: layer %s lacks its index or data blob", l)
		}
	}
	return out, nil
}

// ParseProfileArtifact reads a profile artifact whose subject must be the
// manifest subject, and returns its profile and pack blobs (pack is nil
// when it has none).
func ParseProfileArtifact(raw []byte, subject digest.Digest) (profile ocispec.Descriptor, pack *ocispec.Descriptor, err error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return profile, nil, fmt.Errorf("profile artifact: %w", err)
	}
	if m.ArtifactType != ArtifactTypeProfile || m.Subject == nil || m.Subject.Digest != subject || len(m.Layers) == 0 || len(m.Layers) > 2 {
		return profile, nil, fmt.Errorf("profile artifact: not a profile of %s", subject)
	}
	for i, d := range m.Layers {
		if err := d.Digest.Validate(); err != nil || d.Size < 0 {
			return profile, nil, fmt.Errorf("profile artifact: blob %d: bad descriptor (digest %q, size %d)", i, d.Digest, d.Size)
		}
		switch {
		case i == 0 && d.MediaType == MediaTypeProfile:
			profile = d
		case i == 1 && d.MediaType == MediaTypePack:
			pack = &d
		default:
			return profile, nil, fmt.Errorf("profile artifact: unexpected blob %s of media type %q", d.Digest, d.MediaType)
		}
	}
	if profile.Size > MaxProfileBytes {
		return profile, nil, fmt.Errorf("profile artifact: profile of %d bytes, more than %d", profile.Size, MaxProfileBytes)
	}
	return profile, pack, nil
}
