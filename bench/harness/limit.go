package harness

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// local is an unpacked copy of an image on the node disk, under a local
// overlayfs: the baseline that needs no network at all.
type local struct {
	dir, lower, merged string
}

// unpackLocal copies the image's tree onto the node disk and mounts an
// overlayfs over it (a writable upper, as a container has).
func (e *env) unpackLocal(ctx context.Context, name, tree string) (*local, error) {
	l := &local{dir: filepath.Join(e.disk, "local-"+name)}
	l.lower = filepath.Join(l.dir, "lower")
	l.merged = filepath.Join(l.dir, "merged")
	for _, d := range []string{l.lower, l.merged, filepath.Join(l.dir, "upper"), filepath.Join(l.dir, "work")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if tree != "" {
		if err := run(ctx, "cp", "-a", tree+"/.", l.lower); err != nil {
			return nil, err
		}
	}
	if err := l.mount(ctx); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *local) mount(ctx context.Context) error {
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", l.lower, filepath.Join(l.dir, "upper"), filepath.Join(l.dir, "work"))
	return run(ctx, "mount", "-t", "overlay", "overlay", "-o", opts, l.merged)
}

func (l *local) remove() {
	umountBelow(l.dir)
	syscall.Unmount(l.merged, syscall.MNT_DETACH)
	os.RemoveAll(l.dir)
}

// dropCaches writes dirty pages and drops the page cache, dentries and
// inodes, so the next read comes from the file system below.
func dropCaches() error {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
}

// startRead is what a workload reads from its image at start.
type startRead struct {
	readBytes, compressed int64
	files                 int
	// paths are the regular files of the image the workload read, as
	// absolute paths in the image with symlinks resolved: those it opened,
	// in the order it first opened them, then any other it read (the ELF
	// interpreter the kernel loads, for one).
	paths []string
}

// measureReads runs the workload once under strace in a chroot of the
// local copy, with the page cache dropped and readahead off on the node
// disk, and then counts the pages of the copy the kernel brought in
// (mincore): the bytes the workload reads, reads and page faults alike,
// page-granular. Their gzip size is what a perfect lazy fetch would move.
func (e *env) measureReads(ctx context.Context, l *local, args []string) (startRead, error) {
	var sr startRead
	if e.diskDev != "" {
		out, err := exec.CommandContext(ctx, "blockdev", "--getra", e.diskDev).Output()
		if err == nil {
			ra := strings.TrimSpace(string(out))
			if err := run(ctx, "blockdev", "--setra", "0", e.diskDev); err == nil {
				defer run(context.WithoutCancel(ctx), "blockdev", "--setra", ra, e.diskDev)
			}
		}
	}
	if err := dropCaches(); err != nil {
		return sr, err
	}
	trace := filepath.Join(l.dir, "strace.out")
	cmd := exec.CommandContext(ctx, "strace", append([]string{"-f", "-qq", "-e", "trace=openat,open,execve", "-e", "status=successful", "-o", trace, "chroot", l.merged}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return sr, fmt.Errorf("strace %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	b, err := os.ReadFile(trace)
	if err != nil {
		return sr, err
	}
	// Count the files opened after the workload was executed (the second
	// execve; the first is chroot's own).
	opened := map[string]bool{}
	var order []string
	execs := 0
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, "execve(") {
			execs++
		}
		if execs < 2 {
			continue
		}
		_, rest, ok := strings.Cut(line, `"`)
		if !ok {
			continue
		}
		path, _, _ := strings.Cut(rest, `"`)
		if !opened[path] {
			order = append(order, path)
		}
		opened[path] = true
	}
	sr.files = len(opened)
	listed := map[string]bool{}
	for _, p := range order {
		if real, ok := resolveIn(l.lower, p); ok && !listed[real] {
			if fi, err := os.Stat(filepath.Join(l.lower, real)); err == nil && fi.Mode().IsRegular() {
				sr.paths = append(sr.paths, real)
				listed[real] = true
			}
		}
	}

	zw, _ := gzip.NewWriterLevel(&countWriter{n: &sr.compressed}, gzip.DefaultCompression)
	seen := map[[2]uint64]bool{}
	err = filepath.WalkDir(l.lower, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		key := [2]uint64{st.Dev, st.Ino}
		if info.Size() == 0 || seen[key] {
			return nil
		}
		seen[key] = true
		n, err := residentPages(p, info.Size(), zw)
		sr.readBytes += n
		if rel, _ := filepath.Rel(l.lower, p); n > 0 && !listed["/"+rel] {
			sr.paths = append(sr.paths, "/"+rel)
			listed["/"+rel] = true
		}
		return err
	})
	if err != nil {
		return sr, err
	}
	return sr, zw.Close()
}

// residentPages writes the pages of file that are in the page cache to w
// and returns their byte count.
func residentPages(file string, size int64, w io.Writer) (int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, fmt.Errorf("mmap %s: %w", file, err)
	}
	defer unix.Munmap(m)
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		return 0, fmt.Errorf("mincore %s: %w", file, errno)
	}
	var n int64
	for i, v := range vec {
		if v&1 == 0 {
			continue
		}
		lo, hi := i*page, min((i+1)*page, len(m))
		w.Write(m[lo:hi])
		n += int64(hi - lo)
	}
	return n, nil
}

type countWriter struct{ n *int64 }

func (c *countWriter) Write(p []byte) (int, error) { *c.n += int64(len(p)); return len(p), nil }

// localStart times the workload started with runc from the local copy
// (warm page cache): the part of any start that no network makes faster.
func (e *env) localStart(ctx context.Context, l *local, args []string, want string, runs int) ([]time.Duration, error) {
	bundle := filepath.Join(l.dir, "bundle")
	if err := os.MkdirAll(bundle, 0o755); err != nil {
		return nil, err
	}
	if err := run(ctx, "runc", "spec", "--bundle", bundle); err != nil {
		return nil, err
	}
	cfgFile := filepath.Join(bundle, "config.json")
	b, err := os.ReadFile(cfgFile)
	if err != nil {
		return nil, err
	}
	var spec map[string]any
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, err
	}
	spec["root"] = map[string]any{"path": l.merged, "readonly": false}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = args
	proc["env"] = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if b, err = json.Marshal(spec); err != nil {
		return nil, err
	}
	if err := os.WriteFile(cfgFile, b, 0o644); err != nil {
		return nil, err
	}
	state := filepath.Join(l.dir, "runc")
	var times []time.Duration
	for i := range runs + 1 { // the first run warms the page cache
		cmd := exec.CommandContext(ctx, "runc", "--root", state, "run", "--bundle", bundle, fmt.Sprintf("bench-local-%d-%d", os.Getpid(), i))
		start := time.Now()
		first, _, err := firstLine(start, cmd, want)
		if err != nil {
			return nil, err
		}
		if i > 0 {
			times = append(times, first)
		}
	}
	return times, nil
}

// resolveIn resolves p (absolute in the tree root, or relative to its
// top) inside root, following symlinks as if root were "/", and returns
// the absolute path in the tree, if it exists.
func resolveIn(root, p string) (string, bool) {
	parts := strings.Split(p, "/")
	cur := "/"
	for hops := 0; len(parts) > 0; {
		c := parts[0]
		parts = parts[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, c)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		if hops++; hops > 40 {
			return "", false
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if path.IsAbs(target) {
			cur = "/"
		}
		parts = append(strings.Split(target, "/"), parts...)
	}
	return cur, true
}
