package snapshotter_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/snapshotter"
	"github.com/strata-oci/strata/internal/testenv"
)

// The suite is told the snapshotter is "overlayfs": like containerd's, it
// renames directories of lower layers only with overlayfs's redirect_dir,
// which strata leaves off (committed layers stay plain directories).
const suiteName = "overlayfs"

// TestSuite runs containerd's snapshotter test suite against the strata
// snapshotter with no layer mounts: every snapshot is an ordinary overlay
// snapshot.
func TestSuite(t *testing.T) {
	testenv.RequireRoot(t)
	testsuite.SnapshotterSuite(t, suiteName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := snapshotter.Open(ctx, snapshotter.Options{Root: root})
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

// TestSuiteGRPC runs the suite through containerd's proxy client and
// snapshotter.Serve, as containerd's proxy plugin reaches it: errors must
// keep their kinds (not found, already exists…) across gRPC.
func TestSuiteGRPC(t *testing.T) {
	testenv.RequireRoot(t)
	testsuite.SnapshotterSuite(t, suiteName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := snapshotter.Open(ctx, snapshotter.Options{Root: root})
		if err != nil {
			return nil, nil, err
		}
		sock := filepath.Join(root, "snapshotter.sock")
		sctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- snapshotter.Serve(sctx, sn, sock) }()
		for i := 0; i < 200; i++ {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			select {
			case err := <-done:
				cancel()
				return nil, nil, err
			default:
			}
			time.Sleep(10 * time.Millisecond)
		}
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			cancel()
			return nil, nil, err
		}
		client := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "strata")
		return client, func() error {
			client.Close()
			conn.Close()
			cancel()
			if err := <-done; err != nil {
				return err
			}
			return sn.Close()
		}, nil
	})
}

func TestMounts(t *testing.T) {
	for _, tc := range []struct {
		name        string
		upper, work string
		lowers      []string
		want        []mount.Mount
	}{
		{
			name: "active without parent", upper: "/s/1/fs", work: "/s/1/work",
			want: []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"rw", "rbind"}}},
		},
		{
			name: "empty view", upper: "/s/1/fs",
			want: []mount.Mount{{Type: "bind", Source: "/s/1/fs", Options: []string{"ro", "rbind"}}},
		},
		{
			name: "view of one layer", lowers: []string{"/layers/a/mnt"},
			want: []mount.Mount{{Type: "bind", Source: "/layers/a/mnt", Options: []string{"ro", "rbind"}}},
		},
		{
			name: "view of layers", lowers: []string{"/layers/b/mnt", "/s/1/fs"},
			want: []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{
				"ro", "index=off", "redirect_dir=off", "metacopy=off", "lowerdir=/layers/b/mnt:/s/1/fs"}}},
		},
		{
			name: "active over layers", upper: "/s/3/fs", work: "/s/3/work", lowers: []string{"/layers/b/mnt", "/layers/a/mnt"},
			want: []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{
				"upperdir=/s/3/fs", "workdir=/s/3/work", "index=off", "redirect_dir=off", "metacopy=off",
				"lowerdir=/layers/b/mnt:/layers/a/mnt"}}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := snapshotter.Mounts(tc.upper, tc.work, tc.lowers)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("mounts (-want +got):\n%s", d)
			}
		})
	}
	if _, err := snapshotter.Mounts("/s/1/fs", "/s/1/work", []string{"/a:b"}); err == nil {
		t.Error("a lower with ':' was accepted")
	}
}

func TestHostsPlainHTTP(t *testing.T) {
	dir := t.TempDir()
	write := func(host, toml string) {
		os.MkdirAll(filepath.Join(dir, host), 0o755)
		os.WriteFile(filepath.Join(dir, host, "hosts.toml"), []byte(toml), 0o644)
	}
	write("plain.example:5000", "server = \"http://plain.example:5000\"\n")
	write("mirror.example", "server = \"https://mirror.example\"\n\n[host.\"http://10.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
	write("tls.example", "server = \"https://tls.example\"\n[host.\"https://mirror.tls.example\"]\n")
	h := snapshotter.Hosts(dir)
	// scheme of each endpoint, in order
	for reg, want := range map[string]string{
		"127.0.0.1:5000":     "http://127.0.0.1:5000",
		"localhost:5000":     "http://localhost:5000",
		"[::1]:5000":         "http://[::1]:5000",
		"plain.example:5000": "http://plain.example:5000",
		"mirror.example":     "http://10.0.0.1:5000 https://mirror.example",
		"tls.example":        "https://mirror.tls.example https://tls.example",
		"other.example":      "https://other.example",
		"docker.io":          "https://registry-1.docker.io",
	} {
		eps, err := h.Endpoints(reg, remote.CapPull)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, ep := range eps {
			got = append(got, ep.Scheme+"://"+ep.Host)
		}
		if strings.Join(got, " ") != want {
			t.Errorf("endpoints of %s: %s, want %s", reg, strings.Join(got, " "), want)
		}
	}
	write("_default", "server = \"http://anything\"\n")
	if eps, _ := h.Endpoints("new.example", remote.CapPull); eps[0].Host != "anything" || eps[0].Scheme != "http" {
		t.Errorf("_default/hosts.toml is not used: %+v", eps)
	}
}
