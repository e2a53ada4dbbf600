package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"google.golang.org/grpc"
)

// Serve serves sn over containerd's snapshots gRPC API (a proxy plugin of
// type "snapshot") on the unix socket address until ctx is done.
func Serve(ctx context.Context, sn snapshots.Snapshotter, address string) error {
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return fmt.Errorf("snapshotter socket: %w", err)
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("snapshotter socket: %w", err)
	}
	ln, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("snapshotter socket: %w", err)
	}
	defer os.Remove(address)
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	stop := context.AfterFunc(ctx, rpc.Stop)
	defer stop()
	if err := rpc.Serve(ln); err != nil && ctx.Err() == nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	return nil
}
