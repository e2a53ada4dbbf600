package remote_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
)

// TestReferrers: referrers are found with the Referrers API, and from a
// registry without it (404 on its route) with the referrers tag, which is
// then the only request; filtered by artifact type either way.
func TestReferrers(t *testing.T) {
	ctx := context.Background()
	for _, noAPI := range []bool{false, true} {
		var apiCalls atomic.Int32
		srv := newRegistryServer(t, nil, func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.Contains(r.URL.Path, "/referrers/") {
					apiCalls.Add(1)
					if noAPI {
						http.NotFound(w, r)
						return
					}
				}
				next.ServeHTTP(w, r)
			})
		})
		base, host := srv.URL, hostOf(srv)
		img := buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false)
		img.push(t, base, "app", "v1")
		pushBlob(t, base, "app", ocispec.DescriptorEmptyJSON.MediaType, []byte("{}"))
		profile := pushBlob(t, base, "app", api.MediaTypeProfile, mustJSON(t, api.Profile{Version: 1,
			Pack: &api.Pack{Digest: img.desc.Digest, Size: 1}}))
		art, err := api.ProfileArtifact(img.desc, profile, nil)
		if err != nil {
			t.Fatal(err)
		}
		ad := pushManifest(t, base, "app", digest.FromBytes(art).String(), ocispec.MediaTypeImageManifest, art)
		if noAPI {
			idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{
				{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: api.ArtifactTypeProfile, Digest: ad.Digest, Size: ad.Size},
				{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: "application/example", Digest: ad.Digest, Size: ad.Size},
			}}
			idx.SchemaVersion = 2
			pushManifest(t, base, "app", remote.ReferrersTag(img.desc.Digest), ocispec.MediaTypeImageIndex, mustJSON(t, idx))
		}
		repo := remote.Repository{Registry: host, Name: "app"}
		c := newClient(t, remote.Options{})
		for range 2 {
			descs, err := c.Referrers(ctx, repo, img.desc.Digest, api.ArtifactTypeProfile)
			if err != nil || len(descs) != 1 || descs[0].Digest != ad.Digest {
				t.Fatalf("no API %v: referrers %v, %v; want %s", noAPI, descs, err, ad.Digest)
			}
		}
		if want := int32(1); noAPI && apiCalls.Load() != want {
			t.Errorf("the Referrers API was asked %d times, want once", apiCalls.Load())
		}
		none, err := c.Referrers(ctx, repo, img.desc.Digest, api.ArtifactTypeExpansion)
		if err != nil || len(none) != 0 {
			t.Errorf("no API %v: expansion referrers %v, %v; want none", noAPI, none, err)
		}
		p, err := c.ProfileReferrer(ctx, repo, img.desc.Digest)
		if err != nil || p.Version != 1 || p.Pack != nil {
			t.Errorf("no API %v: profile %+v, %v; want version 1 without its pack", noAPI, p, err)
		}
		if _, err := c.ProfileReferrer(ctx, repo, img.manifest.Config.Digest); !errors.Is(err, remote.ErrNotFound) {
			t.Errorf("profile of a manifest without one: %v, want ErrNotFound", err)
		}
	}
}
