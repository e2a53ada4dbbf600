package criauth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Proxy is a CRI image service that forwards every call to another (the
// container runtime's) and records the credentials of each PullImage in
// its Keychain first.
type Proxy struct {
	runtime.UnimplementedImageServiceServer
	backend runtime.ImageServiceClient
	keys    *Keychain
	log     *slog.Logger
}

// NewProxy returns a proxy in front of backend.
func NewProxy(backend runtime.ImageServiceClient, keys *Keychain, log *slog.Logger) *Proxy {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Proxy{backend: backend, keys: keys, log: log}
}

func (p *Proxy) ListImages(ctx context.Context, r *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return p.backend.ListImages(ctx, r)
}

func (p *Proxy) ImageStatus(ctx context.Context, r *runtime.ImageStatusRequest) (*runtime.ImageStatusResponse, error) {
	return p.backend.ImageStatus(ctx, r)
}

// PullImage keeps the request's credentials for its image, then forwards
// it: the snapshotter mounts the image's layers while the runtime pulls.
func (p *Proxy) PullImage(ctx context.Context, r *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	if img := r.GetImage().GetImage(); img != "" && r.GetAuth() != nil {
		if err := p.keys.Record(img, r.GetAuth()); err != nil {
			return nil, err
		}
		p.log.DebugContext(ctx, "pull credentials kept for the image's layer mounts", "image", img)
	}
	return p.backend.PullImage(ctx, r)
}

func (p *Proxy) RemoveImage(ctx context.Context, r *runtime.RemoveImageRequest) (*runtime.RemoveImageResponse, error) {
	return p.backend.RemoveImage(ctx, r)
}

func (p *Proxy) ImageFsInfo(ctx context.Context, r *runtime.ImageFsInfoRequest) (*runtime.ImageFsInfoResponse, error) {
	return p.backend.ImageFsInfo(ctx, r)
}

// Serve serves the proxy on the unix socket at socket, forwarding to the
// CRI image service at backend (a unix socket path or unix:// address,
// containerd's), until ctx is done.
func Serve(ctx context.Context, socket, backend string, keys *Keychain, log *slog.Logger) error {
	socket = strings.TrimPrefix(socket, "unix://")
	backend = strings.TrimPrefix(backend, "unix://")
	conn, err := grpc.NewClient("unix://"+backend, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("CRI image service proxy: backend %s: %w", backend, err)
	}
	defer conn.Close()
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return err
	}
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("CRI image service proxy: %w", err)
	}
	// The kubelet's credentials pass through it: root only.
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return err
	}
	srv := grpc.NewServer()
	runtime.RegisterImageServiceServer(srv, NewProxy(runtime.NewImageServiceClient(conn), keys, log))
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	log.Info("CRI image service proxy listening", "address", socket, "backend", backend)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}
