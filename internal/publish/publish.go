// Package publish pushes strata's artifacts (expansions, start-up
// profiles) to any OCI registry, as referrers of the image manifests they
// are about. It is built on oras-go, which implements the distribution
// spec's push and referrers flows: for a registry without the Referrers
// API it keeps the referrers tag schema's index (the sha256-<hex> tag) up
// to date when a manifest with a subject is pushed.
//
// The node's read path does not use it (package remote reads, with the
// node's retries, timeouts and range requests); publishing is what
// `strata expand` does, and what a node does when it stores a start-up
// profile in a registry without strata's routes.
package publish

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"
	orasremote "oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/errcode"
	"oras.land/oras-go/v2/registry/remote/retry"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
)

// Options say how to reach registries.
type Options struct {
	// Hosts says which registries are reached over plain HTTP (nil:
	// HTTPS everywhere).
	Hosts *remote.Hosts
	// Credentials returns the credential for a registry (nil: anonymous).
	Credentials remote.CredentialFunc
	// Transport sends the requests (nil: oras-go's default, with retries).
	Transport http.RoundTripper
	// UserAgent is sent with every request (default "strata").
	UserAgent string
}

// A Repo is one repository of one registry, to read from and push to.
type Repo struct {
	repo *orasremote.Repository
	name remote.Repository
}

// Open returns repository r, reached as opts say. Nothing is sent yet.
func Open(r remote.Repository, opts Options) (*Repo, error) {
	// Reads and pushes go to the first host that may push: the registry's
	// own server unless its hosts.toml says otherwise.
	eps, err := opts.Hosts.Endpoints(r.Registry, remote.CapPush)
	if err != nil {
		return nil, err
	}
	ep := eps[0]
	if ep.Path != "/v2" {
		return nil, fmt.Errorf("repository %s: pushing to %s://%s%s: an API root other than /v2 (override_path) is not supported for pushes", r, ep.Scheme, ep.Host, ep.Path)
	}
	rr, err := orasremote.NewRepository(ep.Host + "/" + r.Name)
	if err != nil {
		return nil, fmt.Errorf("repository %s: %w", r, err)
	}
	rr.PlainHTTP = ep.Scheme == "http"
	hc := retry.DefaultClient
	switch {
	case opts.Transport != nil:
		hc = &http.Client{Transport: opts.Transport}
	case ep.Client != nil: // TLS settings of its own
		hc = &http.Client{Transport: retry.NewTransport(ep.Client.Transport)}
	}
	credName := r.Registry
	if ep.Mirror {
		credName = ep.Host
	}
	ua := opts.UserAgent
	if ua == "" {
		ua = "strata"
	}
	header := http.Header{"User-Agent": {ua}}
	for k, v := range ep.Header {
		header[k] = v
	}
	client := &auth.Client{Client: hc, Cache: auth.NewCache(), Header: header}
	if creds := opts.Credentials; creds != nil {
		client.Credential = func(ctx context.Context, _ string) (auth.Credential, error) {
			c, err := creds(ctx, credName)
			if err != nil {
				return auth.EmptyCredential, err
			}
			return auth.Credential{Username: c.Username, Password: c.Password, RefreshToken: c.IdentityToken}, nil
		}
	}
	rr.Client = client
	return &Repo{repo: rr, name: r}, nil
}

// String is "registry/name".
func (r *Repo) String() string { return r.name.String() }

// Resolve returns the descriptor of the manifest or index reference (a tag
// or a digest) names.
func (r *Repo) Resolve(ctx context.Context, reference string) (ocispec.Descriptor, error) {
	d, err := r.repo.Resolve(ctx, reference)
	if err != nil {
		return d, r.wrap("resolve "+reference, err)
	}
	return d, nil
}

// ReadManifest reads the manifest or index desc names, verified.
func (r *Repo) ReadManifest(ctx context.Context, desc ocispec.Descriptor) ([]byte, error) {
	const limit = 4 << 20
	if desc.Size > limit {
		return nil, fmt.Errorf("manifest %s@%s is %d bytes, more than %d", r, desc.Digest, desc.Size, limit)
	}
	rc, err := r.repo.Manifests().Fetch(ctx, desc)
	if err != nil {
		return nil, r.wrap("fetch manifest "+desc.Digest.String(), err)
	}
	defer rc.Close()
	b, err := content.ReadAll(rc, desc)
	if err != nil {
		return nil, r.wrap("read manifest "+desc.Digest.String(), err)
	}
	return b, nil
}

// FetchBlob opens blob desc; the caller verifies what it reads (the
// digest of the whole stream).
func (r *Repo) FetchBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	rc, err := r.repo.Blobs().Fetch(ctx, desc)
	if err != nil {
		return nil, r.wrap("fetch blob "+desc.Digest.String(), err)
	}
	return rc, nil
}

// HasBlob reports whether the repository has blob desc.
func (r *Repo) HasBlob(ctx context.Context, desc ocispec.Descriptor) (bool, error) {
	ok, err := r.repo.Blobs().Exists(ctx, desc)
	if err != nil {
		return false, r.wrap("look for blob "+desc.Digest.String(), err)
	}
	return ok, nil
}

// PushBlob pushes blob desc read from content, unless the repository has
// it already; pushed says whether it was sent.
func (r *Repo) PushBlob(ctx context.Context, desc ocispec.Descriptor, open func() (io.ReadCloser, error)) (pushed bool, err error) {
	if ok, err := r.HasBlob(ctx, desc); err != nil || ok {
		return false, err
	}
	rc, err := open()
	if err != nil {
		return false, err
	}
	defer rc.Close()
	if err := r.repo.Blobs().Push(ctx, desc, rc); err != nil && !errors.Is(err, errdef.ErrAlreadyExists) {
		return false, r.wrap("push blob "+desc.Digest.String(), err)
	}
	return true, nil
}

// PushFile pushes the file at path as blob desc, unless the repository
// has it already.
func (r *Repo) PushFile(ctx context.Context, desc ocispec.Descriptor, path string) (bool, error) {
	return r.PushBlob(ctx, desc, func() (io.ReadCloser, error) { return os.Open(path) })
}

// PushBytes pushes b as a blob of mediaType, unless the repository has it.
func (r *Repo) PushBytes(ctx context.Context, mediaType string, b []byte) (ocispec.Descriptor, error) {
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	_, err := r.PushBlob(ctx, desc, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	return desc, err
}

// PushArtifact pushes artifact manifest b (an image manifest with a
// subject; its blobs must be there) by digest, and, on a registry without
// the Referrers API, adds it to its subject's referrers tag index. The
// empty config blob is pushed first.
func (r *Repo) PushArtifact(ctx context.Context, b []byte) (ocispec.Descriptor, error) {
	if _, err := r.PushBytes(ctx, ocispec.DescriptorEmptyJSON.MediaType, ocispec.DescriptorEmptyJSON.Data); err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := r.repo.Manifests().Push(ctx, desc, bytes.NewReader(b)); err != nil {
		return desc, r.wrap("push artifact "+desc.Digest.String(), err)
	}
	return desc, nil
}

// Referrers lists the manifests whose subject is subject and whose
// artifact type is artifactType, with the Referrers API or the referrers
// tag.
func (r *Repo) Referrers(ctx context.Context, subject ocispec.Descriptor, artifactType string) ([]ocispec.Descriptor, error) {
	var out []ocispec.Descriptor
	err := r.repo.Referrers(ctx, subject, artifactType, func(page []ocispec.Descriptor) error {
		out = append(out, page...)
		return nil
	})
	if err != nil {
		return nil, r.wrap("list referrers of "+subject.Digest.String(), err)
	}
	return out, nil
}

// ReferrersTag reports whether the repository holds the referrers tag
// schema's index of subject (the tag a client keeps for a registry
// without the Referrers API).
func (r *Repo) ReferrersTag(ctx context.Context, subject digest.Digest) bool {
	_, err := r.repo.Resolve(ctx, remote.ReferrersTag(subject))
	return err == nil
}

// wrap names the repository and what was refused in err.
func (r *Repo) wrap(what string, err error) error {
	if errors.Is(err, auth.ErrBasicCredentialNotFound) {
		return fmt.Errorf("%s: %s refused it: it asks for credentials and there are none for %s (docker login): %w", what, r, r.name.Registry, err)
	}
	var ec *errcode.ErrorResponse
	if errors.As(err, &ec) {
		switch ec.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("%s: %s refused it (%d %s): %w", what, r, ec.StatusCode, http.StatusText(ec.StatusCode), err)
		}
	}
	return fmt.Errorf("%s in %s: %w", what, r, err)
}

// PushProfile stores profile p of the image whose manifest is subject as a
// profile artifact referring to it.
func (r *Repo) PushProfile(ctx context.Context, subject ocispec.Descriptor, p []byte) (ocispec.Descriptor, error) {
	pd, err := r.PushBytes(ctx, api.MediaTypeProfile, p)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	b, err := api.ProfileArtifact(subject, pd, nil)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return r.PushArtifact(ctx, b)
}
