package main

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/stargz-snapshotter/fs/source"
)

// prefetchSize is what stargz prefetches of a layer that has no prefetch
// landmark (ctr-remote rpull's default); eStargz layers always have one.
const prefetchSize = 10 << 20

// rpull pulls ref into the containerd at addr (namespace "default", as
// ctr uses) and unpacks it with the stargz snapshotter: the layer
// descriptors carry stargz's labels (reference, digest, the image's
// layers), so the snapshotter mounts each layer from the registry instead
// of letting containerd download it. Manifest and config are fetched as
// usual. Plain HTTP for every registry (the harness's registries are).
func rpull(ctx context.Context, addr, snapshotter, ref string) error {
	c, err := client.New(addr, client.WithDefaultNamespace(namespaces.Default))
	if err != nil {
		return err
	}
	defer c.Close()
	ctx = namespaces.WithNamespace(ctx, namespaces.Default)
	ctx, done, err := c.WithLease(ctx)
	if err != nil {
		return err
	}
	defer done(context.WithoutCancel(ctx))
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts)),
	})
	_, err = c.Pull(ctx, ref,
		client.WithResolver(resolver),
		client.WithPullUnpack,
		client.WithPullSnapshotter(snapshotter),
		client.WithImageHandlerWrapper(source.AppendDefaultLabelsHandlerWrapper(ref, prefetchSize)),
	)
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	return nil
}
