package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

// plainRegistry starts strata's registry with no layer-mount API, as any
// OCI registry: with the Referrers API, or, with noReferrersAPI, without
// it (its route answers 404, as the CNCF distribution registry does).
func plainRegistry(t *testing.T, noReferrersAPI bool) (base, host string) {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var h http.Handler = registry.New(st, registry.Options{})
	if noReferrersAPI {
		inner := h
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.Contains(r.URL.Path, "/referrers/") {
				http.NotFound(w, r)
				return
			}
			inner.ServeHTTP(w, r)
		})
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL, srv.Listener.Addr().String()
}

func get(t *testing.T, url, accept string) []byte {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	return b
}

func pushBlob(t *testing.T, base, repo string, b []byte) ocispec.Descriptor {
	t.Helper()
	d := digest.FromBytes(b)
	put(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+d.String(), "", b)
	return ocispec.Descriptor{Digest: d, Size: int64(len(b))}
}

// expansionOf expands layer l of repo (read from the registry) as
// strata's registry does, pushes the index and data blobs, and returns
// them.
func expansionOf(t *testing.T, base, repo string, l ocispec.Descriptor) (api.LayerExpansion, []byte) {
	t.Helper()
	blob := get(t, base+"/v2/"+repo+"/blobs/"+l.Digest.String(), "")
	var data, idx bytes.Buffer
	ix, err := layerindex.Build(context.Background(), bytes.NewReader(blob), &data, layerindex.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := ix.Encode(&idx); err != nil {
		t.Fatal(err)
	}
	return api.LayerExpansion{Layer: l.Digest, Index: pushBlob(t, base, repo, idx.Bytes()), Data: pushBlob(t, base, repo, data.Bytes())}, data.Bytes()
}

// pushArtifact pushes an expansion artifact of manifest subject listing
// exps; withTag also keeps the referrers tag (for a registry without the
// Referrers API).
func pushArtifact(t *testing.T, base, repo string, subject ocispec.Descriptor, exps []api.LayerExpansion, withTag bool) {
	t.Helper()
	pushBlob(t, base, repo, []byte("{}"))
	b, err := api.ExpansionArtifact(subject, exps)
	if err != nil {
		t.Fatal(err)
	}
	ad := digest.FromBytes(b)
	put(t, "PUT", base+"/v2/"+repo+"/manifests/"+ad.String(), ocispec.MediaTypeImageManifest, b)
	if withTag {
		idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{{
			MediaType: ocispec.MediaTypeImageManifest, ArtifactType: api.ArtifactTypeExpansion, Digest: ad, Size: int64(len(b)),
		}}}
		idx.SchemaVersion = 2
		ib, _ := json.Marshal(idx)
		put(t, "PUT", base+"/v2/"+repo+"/manifests/"+remote.ReferrersTag(subject.Digest), ocispec.MediaTypeImageIndex, ib)
	}
}

func manifestOf(t *testing.T, base, repo, tag string) ocispec.Descriptor {
	t.Helper()
	b := get(t, base+"/v2/"+repo+"/manifests/"+tag, ocispec.MediaTypeImageManifest)
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(b), Size: int64(len(b))}
}

// TestPullReferrers: from a registry without layer mounts, a node mounts
// the layers lazily from the expansion artifact that refers to the image,
// found with the Referrers API or the referrers tag; an artifact that
// lies about a layer (the index of another layer, a data blob that is not
// the index's, a data blob that is missing) costs that layer a full pull
// and nothing else.
func TestPullReferrers(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		noAPI bool
		// lie changes the expansions before they are published; lied
		// names the layers that must be pulled whole.
		lie   func(t *testing.T, base string, exps []api.LayerExpansion)
		after func(t *testing.T, base string, exps []api.LayerExpansion)
		lied  []int
	}{
		{name: "referrers API"},
		{name: "referrers tag", noAPI: true},
		{name: "index of another layer", lie: func(t *testing.T, base string, exps []api.LayerExpansion) {
			exps[0].Index = exps[1].Index
		}, lied: []int{0}},
		{name: "truncated data blob", noAPI: true, lie: func(t *testing.T, base string, exps []api.LayerExpansion) {
			// A data blob cut short, pushed under its own digest.
			b := get(t, base+"/v2/app/blobs/"+exps[2].Data.Digest.String(), "")
			exps[2].Data = pushBlob(t, base, "app", b[:len(b)/2])
		}, lied: []int{2}},
		{name: "missing data blob", lie: func(t *testing.T, base string, exps []api.LayerExpansion) {
			// Pushed for the artifact (a registry refuses a manifest
			// naming missing blobs), removed after it.
			exps[1].Data = pushBlob(t, base, "app", []byte("removed after the artifact"))
		}, after: func(t *testing.T, base string, exps []api.LayerExpansion) {
			req, _ := http.NewRequest("DELETE", base+"/v2/app/blobs/"+exps[1].Data.Digest.String(), nil)
			if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusAccepted {
				t.Fatalf("delete blob: %v %v", resp, err)
			}
		}, lied: []int{1}},
		{name: "corrupt index", lie: func(t *testing.T, base string, exps []api.LayerExpansion) {
			exps[1].Index = pushBlob(t, base, "app", []byte("STRATAIX not an index"))
		}, lied: []int{1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, host := plainRegistry(t, tc.noAPI)
			layers := pushImage(t, base, "app", "v1", 3)
			subject := manifestOf(t, base, "app", "v1")
			var exps []api.LayerExpansion
			for _, l := range layers {
				e, _ := expansionOf(t, base, "app", l)
				exps = append(exps, e)
			}
			if tc.lie != nil {
				tc.lie(t, base, exps)
			}
			pushArtifact(t, base, "app", subject, exps, tc.noAPI)
			if tc.after != nil {
				tc.after(t, base, exps)
			}

			f := newFakeMounter()
			m := openNode(t, t.TempDir(), f, node.Options{})
			defer m.Close(ctx)
			img, err := m.Pull(ctx, host+"/app:v1")
			if err != nil {
				t.Fatal(err)
			}
			if img.Source != node.SourceReferrers {
				t.Fatalf("pulled with source %q (%s), want %q", img.Source, img.Reason, node.SourceReferrers)
			}
			wantMode := node.ModeLazy
			if tc.lied != nil {
				wantMode = node.ModeUnpacked
			}
			if img.Mode != wantMode {
				t.Errorf("mode %s (%s), want %s", img.Mode, img.Reason, wantMode)
			}
			modes := map[digest.Digest]string{}
			for _, u := range m.DF().Layers {
				modes[digest.Digest(u.Digest)] = u.Mode
			}
			for i, l := range layers {
				want := node.ModeLazy
				for _, j := range tc.lied {
					if i == j {
						want = node.ModeUnpacked
					}
				}
				if modes[l.Digest] != want {
					t.Errorf("layer %d: mode %q, want %q", i, modes[l.Digest], want)
				}
			}
		})
	}
}

// TestPullNoExpansion: a registry without layer mounts and an image
// without an expansion referrer is a full pull that says why.
func TestPullNoExpansion(t *testing.T) {
	ctx := context.Background()
	for _, noAPI := range []bool{false, true} {
		base, host := plainRegistry(t, noAPI)
		pushImage(t, base, "app", "v1", 2)
		m := openNode(t, t.TempDir(), newFakeMounter(), node.Options{})
		img, err := m.Pull(ctx, host+"/app:v1")
		m.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if img.Mode != node.ModeUnpacked || img.Source != "" || !strings.Contains(img.Reason, "no expansion referrer") {
			t.Errorf("no Referrers API %v: pulled %s from %q (%s), want a full pull saying there is no expansion referrer", noAPI, img.Mode, img.Source, img.Reason)
		}
	}
}

// TestMountLayerReferrers: the snapshotter's path (MountLayer, one layer
// at a time) mounts from an expansion referrer too, and refuses a layer
// whose expansion lies.
func TestMountLayerReferrers(t *testing.T) {
	ctx := context.Background()
	base, host := plainRegistry(t, true)
	layers := pushImage(t, base, "app", "v1", 2)
	subject := manifestOf(t, base, "app", "v1")
	good, _ := expansionOf(t, base, "app", layers[0])
	lie, _ := expansionOf(t, base, "app", layers[1])
	lie.Index = good.Index // layer 0's index, offered for layer 1
	pushArtifact(t, base, "app", subject, []api.LayerExpansion{good, lie}, true)

	f := newFakeMounter()
	m := openNode(t, t.TempDir(), f, node.Options{})
	defer m.Close(ctx)
	ref, _ := remote.ParseReference(host + "/app:v1")
	img, err := m.Resolve(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	_, release, err := m.MountLayer(ctx, ref.Repository, img.Digest, layers[0], img.Config.RootFS.DiffIDs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if _, _, err := m.MountLayer(ctx, ref.Repository, img.Digest, layers[1], img.Config.RootFS.DiffIDs[1]); !errors.Is(err, node.ErrNoLayerMount) {
		t.Errorf("a lying expansion: %v, want ErrNoLayerMount", err)
	}
}
