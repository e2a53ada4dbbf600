package node_test

import (
	"context"
	"testing"
	"time"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// TestMountLayerProfile: a layer mounted for the snapshotter (MountLayer,
// one layer at a time, no container start) prefetches the frames its
// image's start-up profile lists for it, before anything reads; without a
// profile, or with profiles off, nothing is fetched until a read.
func TestMountLayerProfile(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	layers := pushImage(t, "http://"+host, "app", "v1", 2)
	ref, _ := remote.ParseReference(host + "/app:v1")
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	img, err := c.Resolve(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	md, err := c.Mount(ctx, ref.Repository, layers[1].Digest)
	if err != nil {
		t.Fatal(err)
	}
	profile := &api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: md.Layer, Data: md.Data.Digest, Frames: []int{0}}}}

	fetched := func(opts node.Options, withProfile bool) float64 {
		t.Helper()
		m := openNode(t, t.TempDir(), newFakeMounter(), opts)
		defer m.Close(ctx)
		if withProfile {
			if err := c.PutProfile(ctx, ref.Repository, img.Digest, profile); err != nil {
				t.Fatal(err)
			}
		}
		_, release, err := m.MountLayer(ctx, ref.Repository, img.Digest, layers[1], img.Config.RootFS.DiffIDs[1])
		if err != nil {
			t.Fatal(err)
		}
		defer release()
		if !withProfile || opts.Profiles == node.ProfilesOff {
			time.Sleep(300 * time.Millisecond) // a prefetch would have begun
			return scrape(t, m)[`strata_node_frames_total{from="registry"}`]
		}
		s := waitMetric(t, m, `strata_node_frames_total{from="registry"}`, func(v float64) bool { return v >= 1 })
		return s[`strata_node_frames_total{from="registry"}`]
	}
	if n := fetched(node.Options{}, false); n != 0 {
		t.Errorf("without a profile: %v frames fetched before any read, want 0", n)
	}
	if n := fetched(node.Options{}, true); n < 1 {
		t.Errorf("with a profile: %v frames prefetched, want ≥ 1", n)
	}
	if n := fetched(node.Options{Profiles: node.ProfilesOff}, true); n != 0 {
		t.Errorf("with profiles off: %v frames fetched before any read, want 0", n)
	}
}
