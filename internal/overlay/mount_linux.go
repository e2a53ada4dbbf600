package overlay

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Do performs m at target. Overlay mounts use the new mount API
// (fsopen/fsconfig/fsmount/move_mount) with one "lowerdir+" per layer, so
// any number of layers fits (kernel 6.8+); older kernels get mount(2).
func (m Mount) Do(target string) error {
	if m.Type == "bind" {
		if err := unix.Mount(m.Source, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", m.Source, target, err)
		}
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY)
		if m.NoSuid {
			flags |= unix.MS_NOSUID | unix.MS_NODEV
		}
		if err := unix.Mount("", target, "", flags, ""); err != nil {
			unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("read-only remount of %s: %w", target, err)
		}
		return nil
	}
	err := m.fsconfig(target)
	if err == nil {
		return nil
	}
	data := m.Data()
	if len(data) >= os.Getpagesize() {
		return fmt.Errorf("overlay on %s: %w", target, err)
	}
	var flags uintptr
	if m.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if m.NoSuid {
		flags |= unix.MS_NOSUID | unix.MS_NODEV
	}
	if err2 := unix.Mount("overlay", target, "overlay", flags, data); err2 != nil {
		return fmt.Errorf("overlay on %s: %w (fsconfig: %v)", target, err2, err)
	}
	return nil
}

func (m Mount) fsconfig(target string) error {
	fd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen: %w", err)
	}
	defer unix.Close(fd)
	for _, l := range m.Lowers {
		if err := unix.FsconfigSetString(fd, "lowerdir+", l); err != nil {
			return fmt.Errorf("lowerdir+ %s: %w", l, err)
		}
	}
	for _, o := range m.Options {
		k, v, hasV := strings.Cut(o, "=")
		if hasV {
			err = unix.FsconfigSetString(fd, k, v)
		} else {
			err = unix.FsconfigSetFlag(fd, k)
		}
		if err != nil {
			return fmt.Errorf("option %s: %w", o, err)
		}
	}
	if m.ReadOnly {
		if err := unix.FsconfigSetFlag(fd, "ro"); err != nil {
			return fmt.Errorf("ro: %w", err)
		}
	}
	if err := unix.FsconfigCreate(fd); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	var attr int
	if m.ReadOnly {
		attr |= unix.MOUNT_ATTR_RDONLY
	}
	if m.NoSuid {
		attr |= unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	}
	mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, attr)
	if err != nil {
		return fmt.Errorf("fsmount: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount: %w", err)
	}
	return nil
}

// Unmount unmounts target; with lazy, detached even while busy.
func Unmount(target string, lazy bool) error {
	flags := 0
	if lazy {
		flags = unix.MNT_DETACH
	}
	if err := unix.Unmount(target, flags); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}
