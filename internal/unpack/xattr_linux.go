package unpack

import (
	"runtime"
	"strconv"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// noSetxattrat records that the kernel lacks setxattrat (Linux < 6.13).
var noSetxattrat atomic.Bool

// lsetxattrat sets an extended attribute on name in dirfd without following
// a symbolic link: setxattrat(2), or on older kernels setxattr through the
// /proc/self/fd link of an O_PATH descriptor, which names the inode itself.
func lsetxattrat(dirfd int, name, attr string, value []byte) error {
	if !noSetxattrat.Load() {
		err := setxattrat(dirfd, name, unix.AT_SYMLINK_NOFOLLOW, attr, value)
		if err != unix.ENOSYS {
			return err
		}
		noSetxattrat.Store(true)
	}
	fd, err := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Setxattr("/proc/self/fd/"+strconv.Itoa(fd), attr, value, 0)
}

// xattrArgs is struct xattr_args of linux/xattr.h.
type xattrArgs struct {
	value uint64
	size  uint32
	flags uint32
}

func setxattrat(dirfd int, name string, atFlags int, attr string, value []byte) error {
	p, err := unix.BytePtrFromString(name)
	if err != nil {
		return err
	}
	a, err := unix.BytePtrFromString(attr)
	if err != nil {
		return err
	}
	args := xattrArgs{size: uint32(len(value))}
	if len(value) > 0 {
		args.value = uint64(uintptr(unsafe.Pointer(&value[0])))
	}
	_, _, errno := unix.Syscall6(unix.SYS_SETXATTRAT, uintptr(dirfd), uintptr(unsafe.Pointer(p)),
		uintptr(atFlags), uintptr(unsafe.Pointer(a)), uintptr(unsafe.Pointer(&args)), unsafe.Sizeof(args))
	runtime.KeepAlive(value)
	if errno != 0 {
		return errno
	}
	return nil
}
