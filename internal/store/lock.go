package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrRootInUse: another process serves the store's root.
var ErrRootInUse = errors.New("registry root in use")

// LockRoot takes root's lock, which one process holds while it serves the
// store (and before Open, which removes the temporary files of a crash:
// another process's files in progress otherwise). The lock is released by
// unlock, or when the process exits. A root locked by another process is
// ErrRootInUse, naming its pid.
func LockRoot(root string) (unlock func(), err error) {
	return lockFile(root, "lock", "served")
}

// LockGC takes the lock one garbage collection of root holds (beside the
// processes serving it): a second one is ErrRootInUse.
func LockGC(root string) (unlock func(), err error) {
	return lockFile(root, "gc.lock", "being collected")
}

func lockFile(root, name, doing string) (unlock func(), err error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("lock %s: %w", root, err)
	}
	path := filepath.Join(root, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", root, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			holder := "another process"
			if b, err := os.ReadFile(path); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
					holder = fmt.Sprintf("process %d", pid)
				}
			}
			return nil, fmt.Errorf("%w: %s is %s by %s", ErrRootInUse, root, doing, holder)
		}
		return nil, fmt.Errorf("lock %s: %w", root, err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}
