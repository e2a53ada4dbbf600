package remote

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Docker's manifest and config media types (OCI's are in ocispec).
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
	mediaTypeDockerSchema1      = "application/vnd.docker.distribution.manifest.v1+json"
	mediaTypeDockerSchema1JWS   = "application/vnd.docker.distribution.manifest.v1+prettyjws"
)

// Size limits of documents read into memory.
const (
	maxManifestSize = 4 << 20  // the distribution spec's limit
	maxConfigSize   = 16 << 20 // configs with long histories run to megabytes
)

var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex,
	MediaTypeDockerManifest, MediaTypeDockerManifestList,
}, ", ")

// Image is a resolved image: one platform's manifest and its config, both
// verified against their digests.
type Image struct {
	// Ref is the reference that was resolved.
	Ref Reference
	// Digest is the digest of Manifest (the platform's manifest, not the index).
	Digest digest.Digest
	// IndexDigest is the digest of the index Manifest was chosen from, or "".
	IndexDigest digest.Digest
	// Platform is the platform Manifest was chosen for (from the index, else
	// from the config).
	Platform ocispec.Platform
	// MediaType is Manifest's media type (OCI or Docker).
	MediaType string
	// Manifest lists the config and the layers, base layer first.
	Manifest ocispec.Manifest
	// Config is the image configuration: Config.Config holds Entrypoint, Cmd,
	// Env, WorkingDir, User; Config.RootFS.DiffIDs one diff ID per layer.
	Config ocispec.Image
	// RawManifest and RawConfig are the verified bytes.
	RawManifest, RawConfig []byte
}

// Repository is the repository the image was resolved in.
func (img *Image) Repository() Repository { return img.Ref.Repository }

// Resolve fetches the manifest ref names and the image config. A
// multi-platform index resolves to the manifest for Options.Platform's
// platform, the host's by default, else linux/amd64. The manifest is
// verified against the reference's digest, else the registry's
// Docker-Content-Digest header when present; the config against the
// manifest.
func (c *Client) Resolve(ctx context.Context, ref Reference) (*Image, error) {
	return c.ResolveWith(ctx, ref, nil)
}

// ResolveWith is Resolve, calling onManifest with the verified image
// manifest (its digest and content) before it fetches the config, so the
// caller can start work that needs only the manifest, such as layer
// requests, one round trip earlier. onManifest must not block.
func (c *Client) ResolveWith(ctx context.Context, ref Reference, onManifest func(digest.Digest, *ocispec.Manifest)) (*Image, error) {
	img, err := c.resolve(ctx, ref, onManifest)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", ref, err)
	}
	return img, nil
}

func (c *Client) resolve(ctx context.Context, ref Reference, onManifest func(digest.Digest, *ocispec.Manifest)) (*Image, error) {
	img := &Image{Ref: ref}
	raw, mt, d, err := c.fetchManifest(ctx, ref.Repository, ref.Identifier(), ref.Digest, -1)
	if err != nil {
		return nil, err
	}
	var chosen *ocispec.Platform
	// An index may (rarely) point at another index; follow a few.
	for depth := 0; isIndex(mt); depth++ {
		if depth == 3 {
			return nil, fmt.Errorf("%w: indexes nested more than %d deep", ErrUnsupported, depth)
		}
		var idx ocispec.Index
		if err := json.Unmarshal(raw, &idx); err != nil {
			return nil, fmt.Errorf("%w: index %s: %v", ErrInvalidResponse, d, err)
		}
		desc, err := c.choose(ctx, idx)
		if err != nil {
			return nil, fmt.Errorf("index %s: %w", d, err)
		}
		if img.IndexDigest == "" {
			img.IndexDigest = d
		}
		chosen = desc.Platform
		raw, mt, d, err = c.fetchManifest(ctx, ref.Repository, desc.Digest.String(), desc.Digest, desc.Size)
		if err != nil {
			return nil, err
		}
		if desc.MediaType != "" && mt != desc.MediaType {
			return nil, fmt.Errorf("%w: manifest %s is %s, its index says %s", ErrInvalidResponse, d, mt, desc.MediaType)
		}
	}
	if !isImageManifest(mt) {
		return nil, fmt.Errorf("%w: manifest media type %q", ErrUnsupported, mt)
	}
	img.Digest, img.MediaType, img.RawManifest = d, mt, raw
	if err := json.Unmarshal(raw, &img.Manifest); err != nil {
		return nil, fmt.Errorf("%w: manifest %s: %v", ErrInvalidResponse, d, err)
	}
	cfg := img.Manifest.Config
	if cfg.MediaType != ocispec.MediaTypeImageConfig && cfg.MediaType != MediaTypeDockerConfig {
		return nil, fmt.Errorf("%w: %s is not a container image (config media type %q)", ErrUnsupported, d, cfg.MediaType)
	}
	if err := cfg.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("%w: manifest %s: config digest: %v", ErrInvalidResponse, d, err)
	}
	for i, l := range img.Manifest.Layers {
		if err := l.Digest.Validate(); err != nil {
			return nil, fmt.Errorf("%w: manifest %s: layer %d digest: %v", ErrInvalidResponse, d, i, err)
		}
	}
	if onManifest != nil {
		onManifest(d, &img.Manifest)
	}
	img.RawConfig, err = c.readBlob(ctx, ref.Repository, cfg, maxConfigSize)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := json.Unmarshal(img.RawConfig, &img.Config); err != nil {
		return nil, fmt.Errorf("%w: config %s: %v", ErrInvalidResponse, cfg.Digest, err)
	}
	if n, m := len(img.Config.RootFS.DiffIDs), len(img.Manifest.Layers); n != m {
		return nil, fmt.Errorf("%w: config %s has %d diff IDs for %d layers", ErrInvalidResponse, cfg.Digest, n, m)
	}
	if chosen != nil {
		img.Platform = *chosen
	} else {
		img.Platform = ocispec.Platform{OS: img.Config.OS, Architecture: img.Config.Architecture, Variant: img.Config.Variant}
	}
	return img, nil
}

// fetchManifest GETs a manifest and verifies it: against want if set, else
// against the Docker-Content-Digest header if present. size, if >= 0, is the
// size an index said it has. It returns the bytes, media type and digest.
func (c *Client) fetchManifest(ctx context.Context, repo Repository, ident string, want digest.Digest, size int64) ([]byte, string, digest.Digest, error) {
	var (
		raw    []byte
		ctype  string
		header string
	)
	_, err := c.send(ctx, request{
		method:   http.MethodGet,
		registry: repo.Registry,
		path:     "/v2/" + repo.Name + "/manifests/" + ident,
		scope:    repo.scope(),
		header:   http.Header{"Accept": {manifestAccept}},
		read: func(resp *http.Response) error {
			b, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
			if err != nil {
				return fmt.Errorf("read manifest %s: %w", ident, err)
			}
			raw, ctype, header = b, resp.Header.Get("Content-Type"), resp.Header.Get("Docker-Content-Digest")
			return nil
		},
	})
	if err != nil {
		return nil, "", "", err
	}
	name := repo.String() + ":" + ident
	if want != "" {
		name = repo.String() + "@" + ident
	}
	if len(raw) > maxManifestSize {
		return nil, "", "", fmt.Errorf("%w: manifest %s is larger than %d bytes", ErrInvalidResponse, name, maxManifestSize)
	}
	if size >= 0 && int64(len(raw)) != size {
		return nil, "", "", fmt.Errorf("%w: manifest %s is %d bytes, its index says %d", ErrDigestMismatch, name, len(raw), size)
	}
	if want == "" && header != "" {
		d, err := digest.Parse(header)
		if err != nil {
			return nil, "", "", fmt.Errorf("%w: manifest %s: bad Docker-Content-Digest %q", ErrInvalidResponse, name, header)
		}
		want = d
	}
	alg := digest.Canonical
	if want != "" {
		alg = want.Algorithm()
		if !alg.Available() {
			return nil, "", "", fmt.Errorf("%w: digest algorithm %s", ErrUnsupported, alg)
		}
	}
	got := alg.FromBytes(raw)
	if want != "" && got != want {
		return nil, "", "", fmt.Errorf("manifest %s: %w: content is %s", name, ErrDigestMismatch, got)
	}
	mt, err := manifestMediaType(ctype, raw)
	if err != nil {
		return nil, "", "", fmt.Errorf("manifest %s: %w", name, err)
	}
	return raw, mt, got, nil
}

// manifestMediaType takes the document's mediaType, else the Content-Type,
// else guesses from the fields (old OCI documents omit mediaType).
func manifestMediaType(contentType string, raw []byte) (string, error) {
	var doc struct {
		SchemaVersion int               `json:"schemaVersion"`
		MediaType     string            `json:"mediaType"`
		Config        json.RawMessage   `json:"config"`
		Manifests     json.RawMessage   `json:"manifests"`
		FSLayers      []json.RawMessage `json:"fsLayers"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return "", fmt.Errorf("%w: not JSON: %v", ErrInvalidResponse, err)
	}
	if doc.SchemaVersion == 1 || doc.FSLayers != nil {
		return "", fmt.Errorf("%w: Docker schema 1 manifests are deprecated", ErrUnsupported)
	}
	mt := doc.MediaType
	if mt == "" {
		if ct, _, err := mime.ParseMediaType(contentType); err == nil {
			mt = ct
		}
	}
	switch mt {
	case "", "application/json", "application/octet-stream", "text/plain":
		switch {
		case doc.Manifests != nil:
			mt = ocispec.MediaTypeImageIndex
		case doc.Config != nil:
			mt = ocispec.MediaTypeImageManifest
		default:
			return "", fmt.Errorf("%w: document is neither a manifest nor an index", ErrUnsupported)
		}
	case mediaTypeDockerSchema1, mediaTypeDockerSchema1JWS:
		return "", fmt.Errorf("%w: Docker schema 1 manifests are deprecated", ErrUnsupported)
	}
	return mt, nil
}

func isIndex(mt string) bool {
	return mt == ocispec.MediaTypeImageIndex || mt == MediaTypeDockerManifestList
}

func isImageManifest(mt string) bool {
	return mt == ocispec.MediaTypeImageManifest || mt == MediaTypeDockerManifest
}

// choose picks the index entry for the wanted platform, else linux/amd64.
func (c *Client) choose(ctx context.Context, idx ocispec.Index) (ocispec.Descriptor, error) {
	want := HostPlatform()
	if c.opts.Platform != nil {
		want = *c.opts.Platform
	}
	if desc, ok := SelectPlatform(idx.Manifests, want); ok {
		return desc, nil
	}
	fallback := ocispec.Platform{OS: "linux", Architecture: "amd64"}
	if desc, ok := SelectPlatform(idx.Manifests, fallback); ok {
		c.log.WarnContext(ctx, "image has no manifest for this platform; using linux/amd64",
			"platform", platformString(want))
		return desc, nil
	}
	var have []string
	for _, m := range idx.Manifests {
		if m.Platform != nil {
			have = append(have, platformString(*m.Platform))
		}
	}
	return ocispec.Descriptor{}, fmt.Errorf("%w: no manifest for %s or linux/amd64 (the index has %s)",
		ErrNotFound, platformString(want), strings.Join(have, ", "))
}

// HostPlatform is the platform of this machine: runtime.GOOS and GOARCH,
// with the variant for arm (v8 for arm64, the binary's GOARM for arm).
func HostPlatform() ocispec.Platform {
	p := ocispec.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	switch p.Architecture {
	case "arm64":
		p.Variant = "v8"
	case "arm":
		p.Variant = "v7"
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "GOARM" && s.Value != "" {
					p.Variant = "v" + strings.SplitN(s.Value, ",", 2)[0]
				}
			}
		}
	}
	return p
}

// SelectPlatform returns the manifest in descs that best runs on want: OS
// and architecture equal, and a variant want can run (an arm v7 machine runs
// v5–v7; the newest that fits wins). Entries without a platform never match.
func SelectPlatform(descs []ocispec.Descriptor, want ocispec.Platform) (ocispec.Descriptor, bool) {
	want = normalizePlatform(want)
	best, bestRank := -1, -1
	for i, d := range descs {
		if d.Platform == nil {
			continue
		}
		p := normalizePlatform(*d.Platform)
		if p.OS != want.OS || p.Architecture != want.Architecture {
			continue
		}
		rank := variantNumber(p.Variant)
		if rank < 0 || rank > max(variantNumber(want.Variant), 0) {
			continue
		}
		if rank > bestRank {
			best, bestRank = i, rank
		}
	}
	if best < 0 {
		return ocispec.Descriptor{}, false
	}
	return descs[best], true
}

// normalizePlatform maps the aliases found in the wild onto Go's names and
// fills in the implied variants.
func normalizePlatform(p ocispec.Platform) ocispec.Platform {
	p.OS = strings.ToLower(p.OS)
	p.Architecture = strings.ToLower(p.Architecture)
	p.Variant = strings.ToLower(p.Variant)
	switch p.Architecture {
	case "x86_64", "x86-64":
		p.Architecture = "amd64"
	case "aarch64":
		p.Architecture = "arm64"
	case "armhf":
		p.Architecture, p.Variant = "arm", "v7"
	case "armel":
		p.Architecture, p.Variant = "arm", "v6"
	case "i386", "i686":
		p.Architecture = "386"
	}
	switch p.Architecture {
	case "arm64":
		if p.Variant == "" || p.Variant == "8" {
			p.Variant = "v8"
		}
	case "arm":
		if p.Variant == "" {
			p.Variant = "v7"
		}
	case "amd64":
		if p.Variant == "" {
			p.Variant = "v1"
		}
	}
	return p
}

// variantNumber reads "v7" as 7, "v8.2" as 8 and "" as 0; anything else is -1.
func variantNumber(v string) int {
	if v == "" {
		return 0
	}
	major, _, _ := strings.Cut(strings.TrimPrefix(v, "v"), ".")
	n, err := strconv.Atoi(major)
	if err != nil || n < 0 {
		return -1
	}
	return n
}

func platformString(p ocispec.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}
