package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"google.golang.org/grpc"
)

// serve runs stargz's snapshotter, with its default configuration, as a
// containerd proxy plugin on the unix socket addr until ctx is done. Plain
// HTTP is used for loopback registries (stargz's resolver does that for
// localhost and 127.0.0.0/8 by itself).
func serve(ctx context.Context, addr, root, level string) error {
	if err := log.SetLevel(level); err != nil {
		return err
	}
	ctx = log.WithLogger(ctx, log.L)
	var cfg service.Config // stargz's defaults: prefetch and background fetch on, disk caches
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg)
	if err != nil {
		return fmt.Errorf("stargz snapshotter: %w", err)
	}
	defer sn.Close()

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(addr), 0o700); err != nil {
		return err
	}
	os.Remove(addr)
	l, err := net.Listen("unix", addr)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(l) }()
	select {
	case <-ctx.Done():
		rpc.Stop()
		return nil
	case err := <-errc:
		return err
	}
}
