package node_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/layerindex"
)

// expandBlob builds the expansion of a layer blob as a registry does.
func expandBlob(t *testing.T, blob []byte) (*layerindex.Index, []byte) {
	t.Helper()
	var data bytes.Buffer
	ix, err := layerindex.Build(context.Background(), bytes.NewReader(blob), &data, layerindex.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return ix, data.Bytes()
}

// pushExpansion encodes ix, pushes it and its data blob to repo, and
// returns them as the expansion of layer.
func pushExpansion(t *testing.T, base, repo string, layer digest.Digest, ix *layerindex.Index, data []byte) api.LayerExpansion {
	t.Helper()
	raw, err := ix.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return api.LayerExpansion{Layer: layer, Index: pushBlob(t, base, repo, raw), Data: pushBlob(t, base, repo, data)}
}

// foreignTree: the expansion of another tar B, re-encoded with layer A's
// digest and diff ID: every claim the node checks before it mounts holds.
func foreignTree(t *testing.T, a []byte) (*layerindex.Index, []byte) {
	t.Helper()
	ixA, _ := expandBlob(t, a)
	tarB, err := ocilayout.Tar([]ocilayout.Entry{
		{Name: "etc/", Type: '5'},
		{Name: "etc/layer0", Content: []byte("not what the layer holds\n")},
		{Name: "etc/passwd", Content: []byte("root::0:0::/root:/bin/sh\n")},
		// Larger than what opening puts whole into the cache: its reads
		// are served (no passthrough), its pages kept by the kernel.
		{Name: "usr/", Type: '5'},
		{Name: "usr/big", Content: bytes.Repeat([]byte("big file of the other tree\n"), 80_000)},
	})
	if err != nil {
		t.Fatal(err)
	}
	ix, data := expandBlob(t, ocilayout.GzipLayer(tarB).Blob)
	ix.Layer, ix.DiffID = ixA.Layer, ixA.DiffID
	return ix, data
}

// reframe compresses the frames of ix (data) again at level, after change
// alters each frame's content in place, and returns the index and data
// blob: the same tree, other compressed bytes.
func reframe(t *testing.T, ix *layerindex.Index, data []byte, level zstd.EncoderLevel, change func([]byte)) (*layerindex.Index, []byte) {
	t.Helper()
	raw, err := ix.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	nx, err := layerindex.Decode(raw)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderCRC(false), zstd.WithSingleSegment(true))
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for k, f := range ix.Frames {
		content, err := ix.DecodeFrame(k, data[f.COffset:f.COffset+f.CSize])
		if err != nil {
			t.Fatal(err)
		}
		change(content)
		c := enc.EncodeAll(content, nil)
		nx.Frames[k] = layerindex.Frame{COffset: int64(len(out)), CSize: int64(len(c)), UOffset: f.UOffset, USize: f.USize, Digest: digest.FromBytes(c)}
		out = append(out, c...)
	}
	nx.Data, nx.DataSize = digest.FromBytes(out), int64(len(out))
	return nx, out
}

// verifyNode is a node that verifies layers as soon as it has been quiet
// for 50 ms.
func verifyNode(t *testing.T, f *fakeMounter) *node.Manager {
	t.Helper()
	return openNode(t, t.TempDir(), f, node.Options{VerifyQuiet: 50 * time.Millisecond})
}

func waitVerified(t *testing.T, m *node.Manager) {
	t.Helper()
	select {
	case <-m.VerifyIdle():
	case <-time.After(30 * time.Second):
		t.Fatal("verification did not end")
	}
}

// TestVerifyLayers: a registry offers, for layer 0 of an image, an
// expansion whose every claim holds (layer digest, diff ID, data blob)
// but that is not the layer's. The node mounts it (nothing it checked
// before could tell), then verifies it in the background: it refuses it
// (the mount's FS fails reads, the metric counts it, the image is
// marked) and the next start pulls that layer whole, with the layer's
// real content. The image's other layer verifies: it stays lazy. Before,
// the node served the other tree for as long as the layer was used.
func TestVerifyLayers(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		// lie returns the expansion offered for layer blob a.
		lie func(t *testing.T, a []byte) (*layerindex.Index, []byte)
	}{
		{"another tree", foreignTree},
		{"same tree, other frame bytes", func(t *testing.T, a []byte) (*layerindex.Index, []byte) {
			ix, data := expandBlob(t, a)
			return reframe(t, ix, data, zstd.SpeedFastest, func(b []byte) { copy(b, "evil") })
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, host := plainRegistry(t, false)
			layers := pushImage(t, base, "app", "v1", 2)
			blobA := get(t, base+"/v2/app/blobs/"+layers[0].Digest.String(), "")
			ix, data := tc.lie(t, blobA)
			lie := pushExpansion(t, base, "app", layers[0].Digest, ix, data)
			good, _ := expansionOf(t, base, "app", layers[1])
			pushArtifact(t, base, "app", manifestOf(t, base, "app", "v1"), []api.LayerExpansion{lie, good}, false)

			f := newFakeMounter()
			m := verifyNode(t, f)
			defer m.Close(ctx)
			lease, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:1", Ref: host + "/app:v1"})
			if err != nil {
				t.Fatal(err)
			}
			if lease.Image.Mode != node.ModeLazy {
				t.Fatalf("pulled %s (%s): the lie is not one the node sees before mounting", lease.Image.Mode, lease.Image.Reason)
			}
			mnt0 := lease.Lowers[1] // top first
			fs0 := f.fsAt(mnt0)
			waitVerified(t, m)

			if !fs0.Refused() {
				t.Error("the mount of the lying layer still serves its tree")
			}
			if fs := f.fsAt(lease.Lowers[0]); fs.Refused() {
				t.Error("the honest layer was refused")
			}
			s := scrape(t, m)
			if s[`strata_node_layer_verifications_total{result="refused"}`] != 1 || s[`strata_node_layer_verifications_total{result="verified"}`] != 1 {
				t.Errorf("verifications: %v refused, %v verified; want 1 and 1", s[`strata_node_layer_verifications_total{result="refused"}`],
					s[`strata_node_layer_verifications_total{result="verified"}`])
			}
			if s[`strata_node_fetched_bytes_total{via="verify"}`] < float64(layers[0].Size+layers[1].Size) {
				t.Errorf("verification fetched %v bytes, less than the layer blobs", s[`strata_node_fetched_bytes_total{via="verify"}`])
			}
			imgs, _ := m.Images()
			if len(imgs) != 1 || len(imgs[0].Refused) != 1 || imgs[0].Refused[0] != layers[0].Digest {
				t.Errorf("image record: %+v, want layer 0 marked refused", imgs)
			}

			// The container ends; the next start pulls layer 0 whole.
			if err := m.Release(ctx, "container:1"); err != nil {
				t.Fatal(err)
			}
			lease, err = m.Acquire(ctx, node.AcquireRequest{ID: "container:2", Ref: host + "/app:v1"})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Release(ctx, "container:2")
			if lease.Image.Mode != node.ModeUnpacked || !strings.Contains(lease.Image.Reason, "verification") {
				t.Errorf("next start: %s (%s), want a full pull saying why", lease.Image.Mode, lease.Image.Reason)
			}
			got, err := os.ReadFile(filepath.Join(lease.Lowers[1], "etc/layer0"))
			if err != nil || !bytes.HasPrefix(got, []byte("layer 0 of v1")) {
				t.Errorf("layer 0 after the full pull: %q, %v; want its own content", got, err)
			}
			if strings.HasSuffix(lease.Lowers[0], "/fs") {
				t.Errorf("the honest layer was pulled whole too: %v", lease.Lowers)
			}
			if _, err := os.Stat(filepath.Join(lease.Lowers[1], "etc/passwd")); err == nil {
				t.Error("the lying tree's file is in the layer")
			}
		})
	}
}

// TestVerifyRecompressed: an honest expansion whose frames another
// builder compressed (another level) has another index digest; the node
// compares the trees and the frames' content, and keeps it.
func TestVerifyRecompressed(t *testing.T) {
	ctx := context.Background()
	base, host := plainRegistry(t, false)
	layers := pushImage(t, base, "app", "v1", 1)
	ix, data := expandBlob(t, get(t, base+"/v2/app/blobs/"+layers[0].Digest.String(), ""))
	ix, data = reframe(t, ix, data, zstd.SpeedFastest, func([]byte) {})
	pushArtifact(t, base, "app", manifestOf(t, base, "app", "v1"), []api.LayerExpansion{pushExpansion(t, base, "app", layers[0].Digest, ix, data)}, false)

	f := newFakeMounter()
	m := verifyNode(t, f)
	defer m.Close(ctx)
	lease, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:1", Ref: host + "/app:v1"})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Release(ctx, "container:1")
	waitVerified(t, m)
	if f.fsAt(lease.Lowers[0]).Refused() {
		t.Error("an honest expansion compressed otherwise was refused")
	}
	if v := scrape(t, m)[`strata_node_layer_verifications_total{result="verified"}`]; v != 1 {
		t.Errorf("%v layers verified, want 1", v)
	}
}

// TestVerifyWaitsForQuiet: verification does not begin while the node is
// busy (here: a start every 20 ms), and with VerifyLayers off none is made.
func TestVerifyWaitsForQuiet(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	pushImage(t, "http://"+host, "app", "v1", 2)

	m := openNode(t, t.TempDir(), newFakeMounter(), node.Options{VerifyQuiet: 300 * time.Millisecond})
	defer m.Close(ctx)
	for i := range 30 {
		id := "mount:" + strings.Repeat("x", i+1)
		if _, err := m.Acquire(ctx, node.AcquireRequest{ID: id, Ref: host + "/app:v1"}); err != nil {
			t.Fatal(err)
		}
		defer m.Release(ctx, id)
		time.Sleep(20 * time.Millisecond)
	}
	if v := scrape(t, m)[`strata_node_fetched_bytes_total{via="verify"}`]; v != 0 {
		t.Errorf("verification fetched %v bytes while the node was busy", v)
	}
	waitVerified(t, m)
	if v := scrape(t, m)[`strata_node_layer_verifications_total{result="verified"}`]; v != 2 {
		t.Errorf("%v layers verified once quiet, want 2", v)
	}

	off := openNode(t, t.TempDir(), newFakeMounter(), node.Options{VerifyLayers: node.VerifyOff})
	defer off.Close(ctx)
	if _, err := off.Acquire(ctx, node.AcquireRequest{ID: "container:1", Ref: host + "/app:v1"}); err != nil {
		t.Fatal(err)
	}
	defer off.Release(ctx, "container:1")
	time.Sleep(200 * time.Millisecond)
	if s := scrape(t, off); s[`strata_node_fetched_bytes_total{via="verify"}`] != 0 || off.Busy() {
		t.Errorf("verification off: fetched %v bytes, busy %v", s[`strata_node_fetched_bytes_total{via="verify"}`], off.Busy())
	}
}

// TestVerifyRefusedMountEIO: with real FUSE, a file of the refused layer
// read before the refusal (its pages in the kernel's cache, its reads
// served by the node) and one never read both fail with EIO once the
// layer is refused. (A file open with passthrough before the refusal
// reads the node's cache, which the node cannot stop: see
// layerfs.FS.Refuse.)
func TestVerifyRefusedMountEIO(t *testing.T) {
	testenv.RequireFUSE(t)
	ctx := context.Background()
	base, host := plainRegistry(t, false)
	layers := pushImage(t, base, "app", "v1", 1)
	ix, data := foreignTree(t, get(t, base+"/v2/app/blobs/"+layers[0].Digest.String(), ""))
	pushArtifact(t, base, "app", manifestOf(t, base, "app", "v1"), []api.LayerExpansion{pushExpansion(t, base, "app", layers[0].Digest, ix, data)}, false)

	m := openRealNode(t, node.Options{VerifyQuiet: 200 * time.Millisecond})
	defer m.Close(ctx)
	lease, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:1", Ref: host + "/app:v1"})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Release(ctx, "container:1")
	mnt := lease.Lowers[0]
	f, err := os.Open(filepath.Join(mnt, "usr/big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64)
	if n, err := f.ReadAt(buf, 0); n == 0 {
		t.Fatalf("read before verification: %v", err)
	}
	waitVerified(t, m)
	if _, err := f.ReadAt(buf, 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("a file open before the refusal: %v, want EIO", err)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "etc/passwd")); !errors.Is(err, syscall.EIO) {
		t.Errorf("a file opened after the refusal: %v, want EIO", err)
	}
}

// openRealNode opens a node that mounts with the kernel (FUSE).
func openRealNode(t *testing.T, opts node.Options) *node.Manager {
	t.Helper()
	opts.Root = t.TempDir()
	opts.Remote = remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	opts.CompleteMax = -1
	m, err := node.Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// fsAt returns the file system mounted at dir.
func (f *fakeMounter) fsAt(dir string) *layerfs.FS {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.layers[dir].fs
}
