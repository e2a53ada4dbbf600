package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/strata-oci/strata/api"
)

// maxReferrers bounds the descriptors Referrers returns (a subject with
// more is a registry or a pusher misbehaving; the first ones are kept).
const maxReferrers = 1024

// Referrers lists the manifests in repo whose subject is subject and whose
// artifact type is artifactType (every one when it is empty), as the
// distribution spec v1.1 finds them: with the Referrers API (GET
// /v2/<name>/referrers/<digest>?artifactType=…), or, from a registry that
// lacks it, with the referrers tag schema (the index tagged
// <alg>-<hex>). None is an empty list and no error, also from a registry
// that has neither. The client remembers, per registry, that it has no
// Referrers API and then asks for the tag alone.
func (c *Client) Referrers(ctx context.Context, repo Repository, subject digest.Digest, artifactType string) ([]ocispec.Descriptor, error) {
	if err := subject.Validate(); err != nil {
		return nil, fmt.Errorf("referrers of %q: %w", subject, err)
	}
	if _, noAPI := c.noReferrersAPI.Load(repo.Registry); !noAPI {
		descs, err := c.referrersByAPI(ctx, repo, subject, artifactType)
		if !errors.Is(err, errNoReferrersAPI) {
			return descs, err
		}
		c.noReferrersAPI.Store(repo.Registry, true)
	}
	descs, err := c.referrersByTag(ctx, repo, subject)
	if err != nil {
		return nil, err
	}
	return filterArtifactType(descs, artifactType), nil
}

// errNoReferrersAPI: the registry answered the Referrers API with 404 (the
// spec's sign that it lacks it: a registry that has it answers 200 with an
// empty index for an unknown subject), or with 400 or 405.
var errNoReferrersAPI = errors.New("registry has no Referrers API")

func (c *Client) referrersByAPI(ctx context.Context, repo Repository, subject digest.Digest, artifactType string) ([]ocispec.Descriptor, error) {
	path := "/v2/" + repo.Name + "/referrers/" + subject.String()
	if artifactType != "" {
		path += "?" + url.Values{"artifactType": {artifactType}}.Encode()
	}
	var idx ocispec.Index
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     path,
		scope:    repo.scope(),
		header:   http.Header{"Accept": {ocispec.MediaTypeImageIndex}},
		read: func(resp *http.Response) error {
			b, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
			if err != nil {
				return fmt.Errorf("read referrers of %s: %w", subject, err)
			}
			if len(b) > maxManifestSize {
				return fmt.Errorf("%w: referrers of %s: more than %d bytes", ErrInvalidResponse, subject, maxManifestSize)
			}
			if err := json.Unmarshal(b, &idx); err != nil {
				return fmt.Errorf("%w: referrers of %s: %v", ErrInvalidResponse, subject, err)
			}
			return nil
		},
	})
	var re *Error
	if errors.As(err, &re) {
		switch re.StatusCode {
		case http.StatusNotFound, http.StatusBadRequest, http.StatusMethodNotAllowed:
			return nil, errNoReferrersAPI
		}
	}
	if err != nil {
		return nil, fmt.Errorf("referrers of %s@%s: %w", repo, subject, err)
	}
	// The filter is optional for a registry (it says with
	// OCI-Filters-Applied whether it applied it): apply it here either way.
	// Pages (a Link header) are not followed: the first page of a registry
	// holds far more than the few artifacts a node looks for.
	return filterArtifactType(idx.Manifests, artifactType), nil
}

// referrersByTag reads the referrers tag schema's index of subject; a
// missing tag is no referrer.
func (c *Client) referrersByTag(ctx context.Context, repo Repository, subject digest.Digest) ([]ocispec.Descriptor, error) {
	tag := ReferrersTag(subject)
	raw, mt, _, err := c.fetchManifest(ctx, repo, tag, "", -1)
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("referrers of %s@%s (tag %s): %w", repo, subject, tag, err)
	}
	if mt != ocispec.MediaTypeImageIndex {
		return nil, fmt.Errorf("%w: referrers tag %s of %s is a %s, not an index", ErrInvalidResponse, tag, repo, mt)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, fmt.Errorf("%w: referrers tag %s of %s: %v", ErrInvalidResponse, tag, repo, err)
	}
	return idx.Manifests, nil
}

// ReferrersTag is the tag of the referrers tag schema for subject:
// <alg>-<hex>, cut to the 128 characters a tag may have.
func ReferrersTag(subject digest.Digest) string {
	t := subject.Algorithm().String() + "-" + subject.Encoded()
	if len(t) > 128 {
		t = t[:128]
	}
	return t
}

func filterArtifactType(descs []ocispec.Descriptor, artifactType string) []ocispec.Descriptor {
	out := make([]ocispec.Descriptor, 0, len(descs))
	for _, d := range descs {
		if len(out) == maxReferrers {
			break
		}
		if artifactType == "" || d.ArtifactType == artifactType {
			out = append(out, d)
		}
	}
	return out
}

// Manifest fetches the manifest desc names (a referrer, a platform's
// manifest) and verifies its size and digest.
func (c *Client) Manifest(ctx context.Context, repo Repository, desc ocispec.Descriptor) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("manifest %q: %w", desc.Digest, err)
	}
	if desc.Size > maxManifestSize {
		return nil, fmt.Errorf("%w: manifest %s@%s is %d bytes, more than %d", ErrUnsupported, repo, desc.Digest, desc.Size, maxManifestSize)
	}
	raw, _, _, err := c.fetchManifest(ctx, repo, desc.Digest.String(), desc.Digest, desc.Size)
	return raw, err
}

// Blob reads a blob of at most limit bytes into memory, verified against
// desc's size and digest.
func (c *Client) Blob(ctx context.Context, repo Repository, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("blob %q: %w", desc.Digest, err)
	}
	b, err := c.readBlob(ctx, repo, desc, limit)
	if err != nil {
		return nil, fmt.Errorf("blob %s@%s: %w", repo, desc.Digest, err)
	}
	return b, nil
}

// BlobSize asks repo for the size of blob d (HEAD): ErrNotFound when it
// does not have it.
func (c *Client) BlobSize(ctx context.Context, repo Repository, d digest.Digest) (int64, error) {
	if err := d.Validate(); err != nil {
		return 0, fmt.Errorf("blob %q: %w", d, err)
	}
	resp, err := c.send(ctx, request{
		method:   http.MethodHead,
		registry: repo.Registry,
		path:     blobPath(repo, d),
		scope:    repo.scope(),
	})
	if err != nil {
		return 0, fmt.Errorf("blob %s@%s: %w", repo, d, err)
	}
	resp.Body.Close()
	if resp.ContentLength < 0 {
		return 0, fmt.Errorf("%w: blob %s@%s: no Content-Length", ErrInvalidResponse, repo, d)
	}
	return resp.ContentLength, nil
}

// ProfileReferrer fetches the start-up profile of the image whose manifest
// is m in repo from a profile artifact that refers to it (the first one
// that reads well), without its pack. None is ErrNotFound.
func (c *Client) ProfileReferrer(ctx context.Context, repo Repository, m digest.Digest) (*api.Profile, error) {
	descs, err := c.Referrers(ctx, repo, m, api.ArtifactTypeProfile)
	if err != nil {
		return nil, err
	}
	var errs []error
	for i, d := range descs {
		if i == 4 {
			break
		}
		p, err := c.profileArtifact(ctx, repo, m, d)
		if err == nil {
			return p, nil
		}
		if ctx.Err() != nil {
			return nil, err
		}
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("start-up profile of %s@%s: %w", repo, m, errors.Join(errs...))
	}
	return nil, fmt.Errorf("start-up profile of %s@%s: %w: no profile artifact refers to it", repo, m, ErrNotFound)
}

func (c *Client) profileArtifact(ctx context.Context, repo Repository, m digest.Digest, d ocispec.Descriptor) (*api.Profile, error) {
	raw, err := c.Manifest(ctx, repo, d)
	if err != nil {
		return nil, err
	}
	pd, _, err := api.ParseProfileArtifact(raw, m)
	if err != nil {
		return nil, fmt.Errorf("%w: artifact %s: %v", ErrInvalidResponse, d.Digest, err)
	}
	b, err := c.Blob(ctx, repo, pd, api.MaxProfileBytes)
	if err != nil {
		return nil, err
	}
	var p api.Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("%w: profile %s: %v", ErrInvalidResponse, pd.Digest, err)
	}
	// A pack's chunks are checked against digests the profile gives, and
	// anyone who can push to the repository can push a profile: unlike
	// frames, which the layer's index verifies, its bytes cannot be tied
	// to the image. The frames are fetched instead.
	p.Pack = nil
	return &p, nil
}

// FetchManifest fetches the manifest or index ref (a tag or a digest)
// names in repo, as it is: verified against the digest when ref is one,
// else against the registry's Docker-Content-Digest when it sends one. It
// returns the bytes, media type and digest.
func (c *Client) FetchManifest(ctx context.Context, repo Repository, ref string) ([]byte, string, digest.Digest, error) {
	var want digest.Digest
	if d, err := digest.Parse(ref); err == nil {
		want = d
	}
	return c.fetchManifest(ctx, repo, ref, want, -1)
}
