package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// These tests run the node's logic (pull, leases, shared layer mounts,
// lingering, restore after a restart) against strata's real registry on a
// real socket, with the kernel's mounts replaced by fakeMounter, so they
// need no root. The integration tests run the same paths with FUSE,
// overlayfs and runc.

// fakeMounter records the mounts a node asks for instead of making them.
type fakeMounter struct {
	mu     sync.Mutex
	layers map[string]*fakeLayer // by mount point
	unions map[string][]string   // mount point → lowers
	// mounted counts layer mounts made, ever; changed is signalled after
	// every mount and unmount.
	mounted int
	changed chan struct{}
	// fail, if set, makes MountLayer fail for a mount point it returns
	// an error for.
	fail func(dir string) error
}

func newFakeMounter() *fakeMounter {
	return &fakeMounter{layers: map[string]*fakeLayer{}, unions: map[string][]string{}, changed: make(chan struct{}, 1)}
}

type fakeLayer struct {
	f   *fakeMounter
	dir string
	fs  *layerfs.FS
	ra  int
}

func (f *fakeMounter) signal() {
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

func (f *fakeMounter) MountLayer(ctx context.Context, dir string, fs *layerfs.FS) (node.LayerMount, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	defer f.signal()
	if f.fail != nil {
		if err := f.fail(dir); err != nil {
			return nil, err
		}
	}
	if f.layers[dir] != nil {
		return nil, fmt.Errorf("%s: mounted twice", dir)
	}
	l := &fakeLayer{f: f, dir: dir, fs: fs, ra: 128}
	f.layers[dir] = l
	f.mounted++
	return l, nil
}

func (l *fakeLayer) SetReadahead(kb int) (int, error) {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	old := l.ra
	l.ra = kb
	return old, nil
}

func (l *fakeLayer) Unmount() error {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	defer l.f.signal()
	if l.f.layers[l.dir] != l {
		return fmt.Errorf("%s: not mounted", l.dir)
	}
	delete(l.f.layers, l.dir)
	return nil
}

func (f *fakeMounter) MountUnion(dir string, lowers []string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, lower := range lowers {
		if f.layers[lower] == nil && !strings.HasSuffix(lower, "/fs") {
			return fmt.Errorf("lower %s is not mounted", lower)
		}
	}
	f.unions[dir] = slices.Clone(lowers)
	return nil
}

func (f *fakeMounter) Unmount(dir string, detach bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	defer f.signal()
	delete(f.unions, dir)
	delete(f.layers, dir)
	return nil
}

// mounts returns the number of layer mounts made.
func (f *fakeMounter) mounts() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounted
}

// state returns the layer mount points and union mount points mounted.
func (f *fakeMounter) state() (layers, unions []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for d := range f.layers {
		layers = append(layers, d)
	}
	for d := range f.unions {
		unions = append(unions, d)
	}
	sort.Strings(layers)
	sort.Strings(unions)
	return layers, unions
}

// waitLayers waits until n layers are mounted.
func (f *fakeMounter) waitLayers(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		if layers, _ := f.state(); len(layers) == n {
			return
		}
		select {
		case <-f.changed:
		case <-deadline:
			layers, _ := f.state()
			t.Fatalf("%d layers mounted, want %d", len(layers), n)
		}
	}
}

// testRegistry starts strata's registry on a real socket; with expansion
// it offers layer mounts.
func testRegistry(t *testing.T, expansion bool) (base, host string) {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts := registry.Options{}
	var svc *expand.Service
	if expansion {
		if svc, err = expand.New(st, expand.Options{}); err != nil {
			t.Fatal(err)
		}
		opts.OnManifest = svc.OnManifest
	}
	reg := registry.New(st, opts)
	if svc != nil {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { svc.Run(ctx); close(done) }()
		t.Cleanup(func() { cancel(); <-done })
		reg.Extension(api.Extension, svc.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
	}
	srv := httptest.NewServer(reg)
	t.Cleanup(srv.Close)
	return srv.URL, srv.Listener.Addr().String()
}

func put(t *testing.T, method, url, contentType string, body []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, url, bytes.NewReader(body))
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("%s %s: %s %s", method, url, resp.Status, b)
	}
}

// pushImage pushes an image of nLayers small gzip layers to repo:tag and
// returns its layers.
func pushImage(t *testing.T, base, repo, tag string, nLayers int) []ocispec.Descriptor {
	t.Helper()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	man.SchemaVersion = 2
	for i := range nLayers {
		tarball, err := ocilayout.Tar([]ocilayout.Entry{
			{Name: "etc/", Type: '5'},
			{Name: fmt.Sprintf("etc/layer%d", i), Content: bytes.Repeat([]byte(fmt.Sprintf("layer %d of %s\n", i, tag)), 100)},
		})
		if err != nil {
			t.Fatal(err)
		}
		l := ocilayout.GzipLayer(tarball)
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
	return man.Layers
}

// openNode opens a node at root with mounter f, reaching registries on
// loopback over plain HTTP.
func openNode(t *testing.T, root string, f *fakeMounter, opts node.Options) *node.Manager {
	t.Helper()
	opts.Root, opts.Mounter = root, f
	opts.Remote = remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	if opts.CompleteMax == 0 {
		opts.CompleteMax = -1
	}
	m, err := node.Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestPull(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		expansion bool
		mode      string
	}{
		{"layer mounts", true, node.ModeLazy},
		{"fallback", false, node.ModeUnpacked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, host := testRegistry(t, tc.expansion)
			layers := pushImage(t, base, "app", "v1", 3)
			f := newFakeMounter()
			root := t.TempDir()
			m := openNode(t, root, f, node.Options{})
			defer m.Close(ctx)
			img, err := m.Pull(ctx, host+"/app:v1")
			if err != nil {
				t.Fatal(err)
			}
			if img.Mode != tc.mode || len(img.Layers) != 3 || !img.PlainHTTP {
				t.Fatalf("pulled %+v, want mode %s, 3 layers, plain HTTP", img, tc.mode)
			}
			imgs, _ := m.Images()
			if len(imgs) != 1 || imgs[0].Digest != img.Digest {
				t.Errorf("images %v, want the pulled one", imgs)
			}
			df := m.DF()
			if len(df.Layers) != 3 {
				t.Fatalf("df lists %d layers, want 3", len(df.Layers))
			}
			for _, u := range df.Layers {
				if u.Mode != tc.mode || u.Mounted {
					t.Errorf("layer %+v: want mode %s, not mounted", u, tc.mode)
				}
			}
			if tc.mode == node.ModeUnpacked {
				b, err := os.ReadFile(filepath.Join(root, "layers", "sha256-"+layers[1].Digest.Encoded(), "fs", "etc", "layer1"))
				if err != nil || !bytes.HasPrefix(b, []byte("layer 1 of v1")) {
					t.Errorf("unpacked layer: %q, %v", b, err)
				}
			}
			if mounted, _ := f.state(); len(mounted) != 0 {
				t.Errorf("a pull mounted %v", mounted)
			}
		})
	}
}

func TestPullUnknownImage(t *testing.T) {
	_, host := testRegistry(t, true)
	m := openNode(t, t.TempDir(), newFakeMounter(), node.Options{})
	defer m.Close(context.Background())
	_, err := m.Pull(context.Background(), host+"/nothing:here")
	if !errors.Is(err, remote.ErrNotFound) {
		t.Fatalf("pull of a missing image: %v, want ErrNotFound", err)
	}
	if n := strings.Count(err.Error(), host+"/nothing:here"); n != 1 {
		t.Errorf("error %q names the reference %d times, want once", err, n)
	}
}

func TestLeasesShareLayers(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	base := "http://" + host
	pushImage(t, base, "app", "v1", 2)
	f := newFakeMounter()
	m := openNode(t, t.TempDir(), f, node.Options{})
	defer m.Close(ctx)
	ref := host + "/app:v1"

	a, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:a", Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	// The image has no start-up profile: this start records one, with the
	// kernel's readahead narrowed so that it lists what the start reads.
	f.mu.Lock()
	for dir, l := range f.layers {
		if l.ra != 16 {
			t.Errorf("readahead of %s during a recording start: %d KiB, want 16", dir, l.ra)
		}
	}
	f.mu.Unlock()
	union := t.TempDir()
	b, err := m.Acquire(ctx, node.AcquireRequest{ID: "mount:" + union, Ref: ref, Union: union})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:a", Ref: ref}); err == nil {
		t.Error("a second lease with the same ID was granted")
	}
	layers, unions := f.state()
	if len(layers) != 2 || f.mounts() != 2 {
		t.Fatalf("layers mounted %v (%d mounts), want 2 shared by both leases", layers, f.mounts())
	}
	if !slices.Equal(a.Lowers, b.Lowers) || len(a.Lowers) != 2 {
		t.Errorf("lowers %v and %v, want the same two", a.Lowers, b.Lowers)
	}
	// Top layer first, as overlayfs wants its lowers.
	if !strings.Contains(a.Lowers[0], a.Image.Layers[1].Digest.Encoded()) {
		t.Errorf("lowers %v: the top layer is not first", a.Lowers)
	}
	if !slices.Equal(unions, []string{union}) || !slices.Equal(f.unions[union], b.Lowers) {
		t.Errorf("unions %v (%v), want %s over %v", unions, f.unions[union], union, b.Lowers)
	}
	if id, ok := m.LeaseByUnion(union); !ok || id != "mount:"+union {
		t.Errorf("LeaseByUnion = %q, %v", id, ok)
	}
	for _, u := range m.DF().Layers {
		if !u.Mounted || u.Refs != 2 {
			t.Errorf("df %+v: want mounted with 2 refs", u)
		}
	}
	if _, err := m.RemoveImage(ctx, ref); err == nil {
		t.Error("an image in use was removed")
	}

	if err := m.Release(ctx, "mount:"+union); err != nil {
		t.Fatal(err)
	}
	if layers, unions := f.state(); len(layers) != 2 || len(unions) != 0 {
		t.Errorf("after one release: layers %v unions %v, want 2 layers, no union", layers, unions)
	}
	if err := m.Release(ctx, "container:a"); err != nil {
		t.Fatal(err)
	}
	f.waitLayers(t, 0) // no linger: unmounted with the last lease
	if err := m.Release(ctx, "container:a"); err == nil {
		t.Error("a lease was released twice")
	}
	if len(m.Leases()) != 0 {
		t.Errorf("leases left: %v", m.Leases())
	}
	if _, err := m.RemoveImage(ctx, ref); err != nil {
		t.Errorf("remove image: %v", err)
	}
}

func TestAcquireFailureReleasesLayers(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	layers := pushImage(t, "http://"+host, "app", "v1", 3)
	f := newFakeMounter()
	bad := layers[1].Digest.Encoded()
	f.fail = func(dir string) error {
		if strings.Contains(dir, bad) {
			return errors.New("injected mount failure")
		}
		return nil
	}
	m := openNode(t, t.TempDir(), f, node.Options{})
	defer m.Close(ctx)
	_, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:a", Ref: host + "/app:v1"})
	if err == nil || !strings.Contains(err.Error(), "injected mount failure") {
		t.Fatalf("acquire: %v, want the mount failure", err)
	}
	// The layers that did mount are released.
	f.waitLayers(t, 0)
	if len(m.Leases()) != 0 {
		t.Errorf("a failed acquire left leases %v", m.Leases())
	}
}

func TestLinger(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	pushImage(t, "http://"+host, "app", "v1", 2)
	f := newFakeMounter()
	const linger = 300 * time.Millisecond
	m := openNode(t, t.TempDir(), f, node.Options{Linger: linger})
	defer m.Close(ctx)
	ref := host + "/app:v1"

	// The next container within the linger finds the layers mounted. On a
	// loaded machine more than the linger may pass between the two, and
	// the layers may rightly have gone: then the test tries again.
	for try := 1; ; try++ {
		if _, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:a", Ref: ref}); err != nil {
			t.Fatal(err)
		}
		mounts := f.mounts()
		released := time.Now()
		if err := m.Release(ctx, "container:a"); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:b", Ref: ref}); err != nil {
			t.Fatal(err)
		}
		took := time.Since(released)
		layers, _ := f.state()
		if len(layers) == 2 && f.mounts() == mounts {
			break
		}
		if took < linger || try == 10 {
			t.Fatalf("layers %v, %d mounted anew, %s after the release: want the 2 lingering ones taken again", layers, f.mounts()-mounts, took)
		}
		if err := m.Release(ctx, "container:b"); err != nil {
			t.Fatal(err)
		}
		f.waitLayers(t, 0)
	}
	released := time.Now()
	if err := m.Release(ctx, "container:b"); err != nil {
		t.Fatal(err)
	}
	f.waitLayers(t, 0)
	if waited := time.Since(released); waited < linger {
		t.Errorf("layers unmounted %s after their last lease, before the %s linger", waited, linger)
	}
	for _, u := range m.DF().Layers {
		if u.Mounted {
			t.Errorf("df: %s still mounted", u.Digest)
		}
	}
}

func TestRestore(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	pushImage(t, "http://"+host, "app", "v1", 2)
	root := t.TempDir()
	f := newFakeMounter()
	m := openNode(t, root, f, node.Options{})
	ref := host + "/app:v1"
	union := t.TempDir()
	if _, err := m.Acquire(ctx, node.AcquireRequest{ID: "mount:" + union, Ref: ref, Union: union}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Acquire(ctx, node.AcquireRequest{ID: "container:gone", Ref: ref, PID: deadPID(t)}); err != nil {
		t.Fatal(err)
	}
	// A crash: the process ends with its mounts in place and its lease
	// records on disk. (Close keeps the records as a crash does; the
	// mounts of the fake stay.)
	layers, unions := f.state()
	m.Close(ctx)
	f2 := newFakeMounter()
	for _, d := range layers {
		f2.layers[d] = &fakeLayer{f: f2, dir: d}
	}
	for _, d := range unions {
		f2.unions[d] = nil
	}
	// A saved index damaged by the crash is fetched again.
	idx := filepath.Join(filepath.Dir(layers[0]), "index")
	if err := os.WriteFile(idx, []byte("torn"), 0o644); err != nil {
		t.Fatal(err)
	}

	m2 := openNode(t, root, f2, node.Options{})
	defer m2.Close(ctx)
	leases := m2.Leases()
	if len(leases) != 1 || leases[0].ID != "mount:"+union || leases[0].Union != union {
		t.Fatalf("restored leases %v, want the union mount only (the dead process's lease dropped)", leases)
	}
	layers2, unions2 := f2.state()
	if !slices.Equal(layers2, layers) || !slices.Equal(unions2, []string{union}) {
		t.Errorf("after restore: layers %v unions %v, want %v and [%s]", layers2, unions2, layers, union)
	}
	// The intact layer was mounted, then released when the damaged one
	// failed; both were mounted once its index was fetched again.
	if f2.mounts() != 3 {
		t.Errorf("restore made %d layer mounts, want 3", f2.mounts())
	}
	if err := m2.Release(ctx, "mount:"+union); err != nil {
		t.Fatal(err)
	}
	f2.waitLayers(t, 0)
}

// deadPID returns the PID of a process that has exited.
func deadPID(t *testing.T) int {
	t.Helper()
	p, err := os.StartProcess("/bin/true", []string{"true"}, &os.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	pid := p.Pid
	if _, err := p.Wait(); err != nil {
		t.Fatal(err)
	}
	return pid
}

func TestMountLayer(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	layers := pushImage(t, "http://"+host, "app", "v1", 2)
	f := newFakeMounter()
	m := openNode(t, t.TempDir(), f, node.Options{})
	defer m.Close(ctx)
	ref, _ := remote.ParseReference(host + "/app:v1")
	if ok, reason := m.OffersMounts(ctx, host); !ok {
		t.Fatalf("registry offers no layer mounts: %s", reason)
	}
	img, err := m.Resolve(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	dir, release, err := m.MountLayer(ctx, ref.Repository, img.Digest, layers[0], img.Config.RootFS.DiffIDs[0])
	if err != nil {
		t.Fatal(err)
	}
	if mounted, _ := f.state(); !slices.Equal(mounted, []string{dir}) {
		t.Errorf("mounted %v, want %s", mounted, dir)
	}
	// Bound to its diff ID: another layer's is refused.
	if _, _, err := m.MountLayer(ctx, ref.Repository, img.Digest, layers[1], img.Config.RootFS.DiffIDs[0]); err == nil {
		t.Error("a layer was mounted under another layer's diff ID")
	}
	release()
	release() // twice is fine
	f.waitLayers(t, 0)

	_, plainHost := testRegistry(t, false)
	if ok, _ := m.OffersMounts(ctx, plainHost); ok {
		t.Error("a registry without the extension offers layer mounts")
	}
	pushImage(t, "http://"+plainHost, "app", "v2", 1) // a layer this node has no index of
	pref, _ := remote.ParseReference(plainHost + "/app:v2")
	pimg, err := m.Resolve(ctx, pref)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := m.MountLayer(ctx, pref.Repository, pimg.Digest, pimg.Manifest.Layers[0], pimg.Config.RootFS.DiffIDs[0]); !errors.Is(err, node.ErrNoLayerMount) {
		t.Errorf("layer of a registry without layer mounts: %v, want ErrNoLayerMount", err)
	}
}

// TestPlainHTTPRemembered: an image pulled over plain HTTP (--plain-http)
// is reached that way again when a node started anew takes a lease on it,
// without the flag.
func TestPlainHTTPRemembered(t *testing.T) {
	ctx := context.Background()
	_, host := testRegistry(t, true)
	pushImage(t, "http://"+host, "app", "v1", 2)
	root := t.TempDir()
	open := func() (*node.Manager, *remote.Hosts) {
		hosts := &remote.Hosts{} // HTTPS unless told
		m, err := node.Open(ctx, node.Options{Root: root, Mounter: newFakeMounter(), CompleteMax: -1,
			Remote: remote.New(remote.Options{Hosts: hosts})})
		if err != nil {
			t.Fatal(err)
		}
		return m, hosts
	}
	m, hosts := open()
	hosts.AllowPlainHTTP(host) // the user's --plain-http
	if img, err := m.Pull(ctx, host+"/app:v1"); err != nil || !img.PlainHTTP {
		t.Fatalf("pull: %+v, %v; want an image pulled over plain HTTP", img, err)
	}
	m.Close(ctx)

	m2, hosts2 := open()
	defer m2.Close(ctx)
	if _, err := m2.Acquire(ctx, node.AcquireRequest{ID: "container:a", Ref: host + "/app:v1"}); err != nil {
		t.Fatal(err)
	}
	if !hosts2.Lookup(host).PlainHTTP {
		t.Error("a lease on an image pulled over plain HTTP does not reach its registry that way")
	}
	if err := m2.Release(ctx, "container:a"); err != nil {
		t.Fatal(err)
	}
}
