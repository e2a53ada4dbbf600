package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/ocilayout"
)

// pushLayers pushes an image of the given layers to repo:tag.
func pushLayers(t *testing.T, base, repo, tag string, layers ...ocilayout.Layer) {
	t.Helper()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}, Config: ocispec.ImageConfig{Cmd: []string{tag}}}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	man.SchemaVersion = 2
	for _, l := range layers {
		d := digest.FromBytes(l.Blob)
		put(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+d.String(), "", l.Blob)
		man.Layers = append(man.Layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: d, Size: int64(len(l.Blob))})
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
	}
	cb, _ := json.Marshal(cfg)
	put(t, "POST", base+"/v2/"+repo+"/blobs/uploads/?digest="+digest.FromBytes(cb).String(), "", cb)
	man.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))}
	mb, _ := json.Marshal(man)
	put(t, "PUT", base+"/v2/"+repo+"/manifests/"+tag, ocispec.MediaTypeImageManifest, mb)
}

func layerOf(t *testing.T, name string, size int) ocilayout.Layer {
	t.Helper()
	tr, err := ocilayout.Tar([]ocilayout.Entry{{Name: name, Content: bytes.Repeat([]byte(name), size/len(name))}})
	if err != nil {
		t.Fatal(err)
	}
	return ocilayout.GzipLayer(tr)
}

// TestRemoveImageFrees: `strata rmi` frees what only that image used — its
// own layers (indexes, or unpacked trees of fallback pulls), not the layer
// another image shares — and `strata gc` what no image uses (a layer an
// older node left behind). Unpacked layers show in df and count against
// the cache's budget. Before, rmi removed only the image record.
func TestRemoveImageFrees(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		expansion bool
		mode      string
	}{{"layer mounts", true, node.ModeLazy}, {"fallback", false, node.ModeUnpacked}} {
		t.Run(tc.name, func(t *testing.T) {
			base, host := testRegistry(t, tc.expansion)
			shared, onlyA, onlyB := layerOf(t, "shared", 300000), layerOf(t, "only-a", 200004), layerOf(t, "only-b", 100002)
			pushLayers(t, base, "app", "a", shared, onlyA)
			pushLayers(t, base, "app", "b", shared, onlyB)
			root := t.TempDir()
			m := openNode(t, root, newFakeMounter(), node.Options{CacheSize: 100 << 20})
			defer m.Close(ctx)
			for _, tag := range []string{"a", "b"} {
				img, err := m.Pull(ctx, host+"/app:"+tag)
				if err != nil || img.Mode != tc.mode {
					t.Fatalf("pull %s: %v %+v", tag, err, img)
				}
			}
			dir := func(l ocilayout.Layer) string {
				d := digest.FromBytes(l.Blob)
				return filepath.Join(root, "layers", "sha256-"+d.Encoded())
			}
			exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
			if tc.mode == node.ModeUnpacked {
				if df := m.DF(); df.UnpackedBytes != 600006 {
					t.Errorf("df: %d bytes unpacked, want 600006", df.UnpackedBytes)
				}
			}
			rep, err := m.RemoveImage(ctx, host+"/app:a")
			if err != nil {
				t.Fatal(err)
			}
			if rep.Layers != 1 || exists(dir(onlyA)) || !exists(dir(shared)) || !exists(dir(onlyB)) {
				t.Errorf("rmi a freed %+v; want only its own layer", rep)
			}
			if tc.mode == node.ModeUnpacked && (rep.LayerBytes < 200004 || m.DF().UnpackedBytes != 400002) {
				t.Errorf("rmi a freed %d bytes, df says %d unpacked; want ≥ 200004 and 400002", rep.LayerBytes, m.DF().UnpackedBytes)
			}
			// A layer no image names (left by an older node): gc only.
			stray := filepath.Join(root, "layers", "sha256-"+digest.FromString("stray").Encoded())
			os.MkdirAll(filepath.Join(stray, "fs"), 0o755)
			os.WriteFile(filepath.Join(stray, "fs", "f"), make([]byte, 1000), 0o644)
			if rep, err := m.GC(ctx); err != nil || rep.Layers != 1 || exists(stray) || !exists(dir(shared)) {
				t.Errorf("gc: %+v %v; want the stray layer removed, b's kept", rep, err)
			}
			if rep, err := m.RemoveImage(ctx, host+"/app:b"); err != nil || rep.Layers != 2 {
				t.Errorf("rmi b: %+v %v; want its 2 layers", rep, err)
			}
			if ents, _ := os.ReadDir(filepath.Join(root, "layers")); len(ents) != 0 {
				t.Errorf("layers left: %v", ents)
			}
			if _, err := m.RemoveImage(ctx, host+"/app:b"); err == nil {
				t.Error("rmi of an image not pulled succeeded")
			}
		})
	}
}
