package nodeapi

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Lock takes root's daemon lock, which a daemon holds for its whole life,
// waiting for a daemon that holds it (one exiting) until ctx is done or
// wait has passed. Call it before opening the node's state; unlock releases
// it, after Serve returned.
func Lock(ctx context.Context, root string, wait time.Duration) (unlock func(), err error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	f, err := flock(ctx, lockPath(root), wait)
	if err != nil {
		return nil, fmt.Errorf("node daemon lock: %w (is another node daemon running on %s?)", err, root)
	}
	return func() { f.Close() }, nil
}

// flock opens path and takes an exclusive lock on it, polling until ctx is
// done or wait has passed; closing the file releases it.
func flock(ctx context.Context, path string, wait time.Duration) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	pause := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, err
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%s is held", path)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 20*time.Millisecond)
	}
}
