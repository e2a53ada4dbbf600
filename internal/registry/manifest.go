package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/store"
)

// Manifest media types the registry accepts.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// maxManifestSize is the largest manifest accepted (the spec's 4 MiB).
const maxManifestSize = 4 << 20

func isIndexType(mt string) bool {
	return mt == ocispec.MediaTypeImageIndex || mt == MediaTypeDockerManifestList
}

func isManifestType(mt string) bool {
	return mt == ocispec.MediaTypeImageManifest || mt == MediaTypeDockerManifest
}

// manifestDoc is the union of the fields of image manifests and indexes;
// parsing into it lets one check catch ambiguous documents.
type manifestDoc struct {
	SchemaVersion *int                 `json:"schemaVersion"`
	MediaType     string               `json:"mediaType"`
	ArtifactType  string               `json:"artifactType"`
	Config        *ocispec.Descriptor  `json:"config"`
	Layers        []ocispec.Descriptor `json:"layers"`
	Manifests     []ocispec.Descriptor `json:"manifests"`
	Subject       *ocispec.Descriptor  `json:"subject"`
	Annotations   map[string]string    `json:"annotations"`
}

// parseManifest validates a pushed manifest against the Content-Type it came
// with and returns the media type to store and what the referrers index needs.
func parseManifest(contentType string, body []byte) (string, store.ManifestMeta, error) {
	var meta store.ManifestMeta
	invalid := func(format string, a ...any) error {
		return newErr(http.StatusBadRequest, codeManifestInvalid, fmt.Sprintf(format, a...))
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		return "", meta, invalid("manifest is not a JSON object: %v", err)
	}
	var doc manifestDoc
	if err := json.Unmarshal(body, &doc); err != nil {
		return "", meta, invalid("manifest fields have the wrong types: %v", err)
	}
	// Which fields it has, as Go decodes them (clients too: containerd
	// checks a pulled manifest so): keys match in any case, and null is
	// a value.
	var present struct {
		Config    json.RawMessage `json:"config"`
		Layers    json.RawMessage `json:"layers"`
		Manifests json.RawMessage `json:"manifests"`
	}
	json.Unmarshal(body, &present) // it decoded as an object above
	hasLayers, hasConfig, hasManifests := len(present.Layers) != 0, len(present.Config) != 0, len(present.Manifests) != 0
	if hasManifests && (hasLayers || hasConfig) {
		return "", meta, invalid("ambiguous manifest: it has both manifests and layers/config")
	}
	if doc.SchemaVersion == nil || *doc.SchemaVersion != 2 {
		return "", meta, invalid("schemaVersion must be 2")
	}
	mt := doc.MediaType
	if mt == "" {
		mt = contentType
	} else if contentType != "" && contentType != mt {
		return "", meta, invalid("Content-Type %q does not match the manifest's mediaType %q", contentType, mt)
	}
	switch {
	case isManifestType(mt):
		if hasManifests {
			return "", meta, invalid("an image manifest cannot have manifests")
		}
		if doc.Config == nil {
			return "", meta, invalid("an image manifest needs a config")
		}
		if err := checkDescriptors(append([]ocispec.Descriptor{*doc.Config}, doc.Layers...)); err != nil {
			return "", meta, invalid("%v", err)
		}
	case isIndexType(mt):
		if hasLayers || hasConfig {
			return "", meta, invalid("an index cannot have layers or config")
		}
		if err := checkDescriptors(doc.Manifests); err != nil {
			return "", meta, invalid("%v", err)
		}
	case mt == "":
		return "", meta, invalid("manifest has no mediaType and the request no Content-Type")
	default:
		return "", meta, newErr(http.StatusBadRequest, codeManifestInvalid, fmt.Sprintf("unsupported manifest media type %q", mt))
	}
	if doc.Subject != nil {
		if err := checkDescriptors([]ocispec.Descriptor{*doc.Subject}); err != nil {
			return "", meta, invalid("subject: %v", err)
		}
		meta.Subject = doc.Subject.Digest
		meta.ArtifactType = doc.ArtifactType
		if meta.ArtifactType == "" && doc.Config != nil {
			meta.ArtifactType = doc.Config.MediaType
		}
		meta.Annotations = doc.Annotations
	}
	return mt, meta, nil
}

func checkDescriptors(ds []ocispec.Descriptor) error {
	for _, d := range ds {
		if err := d.Digest.Validate(); err != nil {
			return fmt.Errorf("descriptor digest %q: %v", d.Digest, err)
		}
		if d.Size < 0 {
			return fmt.Errorf("descriptor %s has a negative size", d.Digest)
		}
		if d.MediaType == "" {
			return fmt.Errorf("descriptor %s has no mediaType", d.Digest)
		}
		if d.Data != nil && int64(len(d.Data)) != d.Size {
			return fmt.Errorf("descriptor %s: data field has %d bytes, size says %d", d.Digest, len(d.Data), d.Size)
		}
		if d.Data != nil && d.Digest.Algorithm().Available() && d.Digest.Algorithm().FromBytes(d.Data) != d.Digest {
			return fmt.Errorf("descriptor %s: data field does not match the digest", d.Digest)
		}
	}
	return nil
}

// checkReferences makes sure that the blobs a pushed manifest names are in
// repo (not an index's manifests: sparse indexes are allowed, nor its
// subject, which may come later, nor foreign layers): a manifest naming missing content is
// refused with MANIFEST_BLOB_UNKNOWN, as distribution does, rather than
// stored broken (a blob that garbage collection removed between a
// client's HEAD and its manifest, for one). The blobs named are made
// young for garbage collection.
func (reg *Registry) checkReferences(repo string, body []byte) error {
	refs := store.ParseReferences(body)
	for _, d := range refs.Blobs {
		if _, err := reg.store.StatBlob(context.Background(), repo, d); err != nil {
			return newErr(http.StatusBadRequest, codeManifestBlobUnknown, fmt.Sprintf("blob %s is not in repository %s", d, repo))
		}
		reg.store.Touch(repo, d)
	}
	return nil
}
