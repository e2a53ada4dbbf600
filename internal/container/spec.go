// Package container turns an image and a user's run options into an OCI
// runtime bundle and runs it with runc.
//
// Spec is pure apart from reading the image's /etc/passwd and /etc/group
// (confined to the root filesystem): it computes the runtime config as data
// that a unit test checks. Running happens in run.go.
package container

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	rspec "github.com/opencontainers/runtime-spec/specs-go"
)

// RunOptions are what the user asked for on the command line.
type RunOptions struct {
	// Args replaces the image's Cmd when non-empty.
	Args []string
	// Entrypoint replaces the image's Entrypoint when non-nil (an empty
	// slice clears it).
	Entrypoint []string
	// Env entries (K=V) override the image's.
	Env []string
	// Workdir overrides the image's WorkingDir.
	Workdir string
	// User overrides the image's User: name, uid, name:group, uid:gid.
	User string
	// Tty allocates a terminal.
	Tty bool
	// Hostname of the container (default: the container's id, shortened).
	Hostname string
	// Volumes are bind mounts "SRC:DST[:ro]".
	Volumes []string
	// Network is "host" or "none" (default "none"... strata has no
	// network plumbing of its own; host shares the node's stack).
	Network string
	// ResolvConf and Hosts are node files bind-mounted read-only into the
	// container when Network is "host".
	ResolvConf, Hosts string
}

// ErrInvalid reports options that cannot be honoured.
var ErrInvalid = errors.New("invalid run options")

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Spec returns the runtime config for running image config cfg, whose root
// filesystem is rootfs, with opts.
func Spec(cfg ocispec.ImageConfig, rootfs string, opts RunOptions) (*rspec.Spec, error) {
	args := append([]string{}, cfg.Entrypoint...)
	if opts.Entrypoint != nil {
		args = append([]string{}, opts.Entrypoint...)
	}
	if len(opts.Args) > 0 {
		args = append(args, opts.Args...)
	} else if opts.Entrypoint == nil || len(opts.Entrypoint) == 0 {
		args = append(args, cfg.Cmd...)
	}
	if len(args) == 0 {
		return nil, fmt.Errorf("%w: the image has no entrypoint or command, and none was given", ErrInvalid)
	}
	env := mergeEnv(cfg.Env, opts.Env)
	if !hasKey(env, "PATH") {
		env = append([]string{defaultPath}, env...)
	}
	if opts.Tty && !hasKey(env, "TERM") {
		env = append(env, "TERM=xterm")
	}
	cwd := cfg.WorkingDir
	if opts.Workdir != "" {
		cwd = opts.Workdir
	}
	if cwd == "" {
		cwd = "/"
	}
	if !path.IsAbs(cwd) {
		return nil, fmt.Errorf("%w: working directory %q is not absolute", ErrInvalid, cwd)
	}
	user := cfg.User
	if opts.User != "" {
		user = opts.User
	}
	u, home, err := resolveUser(rootfs, user)
	if err != nil {
		return nil, err
	}
	if !hasKey(env, "HOME") {
		env = append(env, "HOME="+home)
	}
	hostname := opts.Hostname
	if hostname == "" {
		hostname = "strata"
	}
	s := &rspec.Spec{
		Version: rspec.Version,
		Process: &rspec.Process{
			Terminal:        opts.Tty,
			User:            u,
			Args:            args,
			Env:             env,
			Cwd:             path.Clean(cwd),
			NoNewPrivileges: true,
			Capabilities:    defaultCaps(),
		},
		Root:     &rspec.Root{Path: rootfs},
		Hostname: hostname,
		Mounts:   defaultMounts(),
		Linux: &rspec.Linux{
			Namespaces: []rspec.LinuxNamespace{
				{Type: rspec.PIDNamespace}, {Type: rspec.IPCNamespace}, {Type: rspec.UTSNamespace}, {Type: rspec.MountNamespace},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
				"/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
			},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
			Resources: &rspec.LinuxResources{
				Devices: []rspec.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
		},
	}
	switch opts.Network {
	case "", "none":
		s.Linux.Namespaces = append(s.Linux.Namespaces, rspec.LinuxNamespace{Type: rspec.NetworkNamespace})
	case "host":
		for _, f := range []struct{ src, dst string }{{opts.ResolvConf, "/etc/resolv.conf"}, {opts.Hosts, "/etc/hosts"}} {
			if f.src != "" {
				s.Mounts = append(s.Mounts, rspec.Mount{Destination: f.dst, Type: "bind", Source: f.src, Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
			}
		}
	default:
		return nil, fmt.Errorf("%w: network %q (use host or none)", ErrInvalid, opts.Network)
	}
	for _, v := range opts.Volumes {
		m, err := parseVolume(v)
		if err != nil {
			return nil, err
		}
		s.Mounts = append(s.Mounts, m)
	}
	return s, nil
}

func parseVolume(v string) (rspec.Mount, error) {
	parts := strings.Split(v, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return rspec.Mount{}, fmt.Errorf("%w: volume %q: want SRC:DST[:ro|rw]", ErrInvalid, v)
	}
	src, dst := parts[0], parts[1]
	if !path.IsAbs(src) || !path.IsAbs(dst) {
		return rspec.Mount{}, fmt.Errorf("%w: volume %q: both paths must be absolute", ErrInvalid, v)
	}
	if path.Clean(dst) == "/" {
		return rspec.Mount{}, fmt.Errorf("%w: volume %q: cannot mount over /", ErrInvalid, v)
	}
	opts := []string{"rbind", "rprivate"}
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
			opts = append(opts, "ro")
		case "rw":
		default:
			return rspec.Mount{}, fmt.Errorf("%w: volume %q: mode %q (ro or rw)", ErrInvalid, v, parts[2])
		}
	}
	if _, err := os.Stat(src); err != nil {
		return rspec.Mount{}, fmt.Errorf("%w: volume source: %v", ErrInvalid, err)
	}
	// runc resolves the destination inside the root filesystem (securejoin),
	// so a symlink in the image cannot redirect it to the host.
	return rspec.Mount{Destination: path.Clean(dst), Type: "bind", Source: src, Options: opts}, nil
}

func hasKey(env []string, k string) bool {
	for _, e := range env {
		if key, _, _ := strings.Cut(e, "="); key == k {
			return true
		}
	}
	return false
}

// mergeEnv overrides base with over, keeping base's order.
func mergeEnv(base, over []string) []string {
	out := append([]string{}, base...)
	for _, o := range over {
		k, _, _ := strings.Cut(o, "=")
		replaced := false
		for i, e := range out {
			if ek, _, _ := strings.Cut(e, "="); ek == k {
				out[i], replaced = o, true
			}
		}
		if !replaced {
			out = append(out, o)
		}
	}
	return out
}

func defaultCaps() *rspec.LinuxCapabilities {
	caps := []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
		"CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
	}
	return &rspec.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
}

func defaultMounts() []rspec.Mount {
	return []rspec.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
	}
}

// resolveUser turns "name", "uid", "name:group", "uid:gid" into ids using the
// image's /etc/passwd and /etc/group, read through os.Root so that no
// symlink in the image can point the lookup at the host's files.
func resolveUser(rootfs, user string) (rspec.User, string, error) {
	if user == "" {
		user = "0"
	}
	name, group, hasGroup := strings.Cut(user, ":")
	var u rspec.User
	home := "/"
	passwd := readDB(rootfs, "etc/passwd")
	if uid, err := strconv.ParseUint(name, 10, 32); err == nil {
		u.UID = uint32(uid)
		u.GID = u.UID
		for _, f := range passwd {
			if len(f) >= 6 && f[2] == name {
				gid, _ := strconv.ParseUint(f[3], 10, 32)
				u.GID, home = uint32(gid), f[5]
				break
			}
		}
		if u.UID == 0 {
			u.GID = 0
			if home == "/" {
				home = "/root"
			}
		}
	} else {
		found := false
		for _, f := range passwd {
			if len(f) >= 6 && f[0] == name {
				uid, err1 := strconv.ParseUint(f[2], 10, 32)
				gid, err2 := strconv.ParseUint(f[3], 10, 32)
				if err1 != nil || err2 != nil {
					continue
				}
				u.UID, u.GID, home, found = uint32(uid), uint32(gid), f[5], true
				break
			}
		}
		if !found {
			return u, "", fmt.Errorf("%w: user %q is not in the image's /etc/passwd", ErrInvalid, name)
		}
	}
	groups := readDB(rootfs, "etc/group")
	if hasGroup {
		if gid, err := strconv.ParseUint(group, 10, 32); err == nil {
			u.GID = uint32(gid)
		} else {
			found := false
			for _, f := range groups {
				if len(f) >= 3 && f[0] == group {
					gid, err := strconv.ParseUint(f[2], 10, 32)
					if err == nil {
						u.GID, found = uint32(gid), true
						break
					}
				}
			}
			if !found {
				return u, "", fmt.Errorf("%w: group %q is not in the image's /etc/group", ErrInvalid, group)
			}
		}
	}
	// Supplementary groups of a named user.
	if !hasGroup {
		uname := name
		for _, f := range passwd {
			if len(f) >= 3 && f[2] == strconv.FormatUint(uint64(u.UID), 10) {
				uname = f[0]
				break
			}
		}
		for _, f := range groups {
			if len(f) >= 4 && f[3] != "" {
				for _, m := range strings.Split(f[3], ",") {
					if m == uname {
						if gid, err := strconv.ParseUint(f[2], 10, 32); err == nil && uint32(gid) != u.GID {
							u.AdditionalGids = append(u.AdditionalGids, uint32(gid))
						}
					}
				}
			}
		}
	}
	if home == "" {
		home = "/"
	}
	return u, home, nil
}

// readDB reads a colon-separated database (passwd, group) of the image,
// confined to rootfs. A missing or unreadable file reads as empty.
func readDB(rootfs, name string) [][]string {
	root, err := os.OpenRoot(rootfs)
	if err != nil {
		return nil
	}
	defer root.Close()
	f, err := root.Open(name)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(io.LimitReader(f, 4<<20))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out
}
