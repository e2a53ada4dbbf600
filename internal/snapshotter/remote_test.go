package snapshotter

import (
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/remote"
)

// TestLayerOf checks the binding of a snapshot containerd asks for to the
// image strata resolved: the layer must sit where the chain of diff IDs is
// the snapshot's chain ID.
func TestLayerOf(t *testing.T) {
	l1, l2 := digest.FromString("layer1"), digest.FromString("layer2")
	d1, d2 := digest.FromString("diff1"), digest.FromString("diff2")
	img := &remote.Image{
		Manifest: ocispec.Manifest{Layers: []ocispec.Descriptor{{Digest: l1}, {Digest: l2}, {Digest: l1}}},
		Config:   ocispec.Image{RootFS: ocispec.RootFS{DiffIDs: []digest.Digest{d1, d2, d1}}},
	}
	for _, tc := range []struct {
		name   string
		layer  digest.Digest
		chain  []digest.Digest
		diffID digest.Digest
		ok     bool
	}{
		{"base layer", l1, []digest.Digest{d1}, d1, true},
		{"second layer", l2, []digest.Digest{d1, d2}, d2, true},
		{"a layer repeated higher up", l1, []digest.Digest{d1, d2, d1}, d1, true},
		{"layer at another position", l2, []digest.Digest{d2}, "", false},
		{"chain of another image", l2, []digest.Digest{d2, d2}, "", false},
		{"layer not in the image", digest.FromString("other"), []digest.Digest{d1}, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			desc, diffID, err := layerOf(img, tc.layer, identity.ChainID(tc.chain))
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if tc.ok && (desc.Digest != tc.layer || diffID != tc.diffID) {
				t.Errorf("got %s %s, want %s %s", desc.Digest, diffID, tc.layer, tc.diffID)
			}
		})
	}
}

func TestTargetOf(t *testing.T) {
	full := map[string]string{
		LabelTargetRef:   "sha256:chain",
		LabelImageRef:    "registry.example/app:1",
		LabelLayerDigest: "sha256:layer",
	}
	if _, ok := targetOf(full); !ok {
		t.Error("labels of a CRI pull are not a target")
	}
	for _, drop := range []string{LabelTargetRef, LabelImageRef, LabelLayerDigest} {
		l := map[string]string{}
		for k, v := range full {
			if k != drop {
				l[k] = v
			}
		}
		if _, ok := targetOf(l); ok {
			t.Errorf("labels without %s are a target", drop)
		}
	}
}
