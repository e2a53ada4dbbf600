package harness

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/bench/report"
)

// Read systems.
const (
	readLocal  = "local overlayfs"
	readCold   = "strata cold"
	readWarm   = "strata warm"
	randomRead = 4096
)

// readBench compares reads of the same large files through a strata mount
// (cold: fresh cache, fetched over the unshaped link; warm: all cached)
// and through a local overlayfs over an unpacked copy on the same disk,
// with the page cache dropped before every pass.
func (e *env) readBench(ctx context.Context, runs, files int, size int64) ([]report.Read, error) {
	e.logf("read benchmark: %d files of %d MiB, %d runs", files, size>>20, runs)
	l, err := e.unpackLocal(ctx, "data", "")
	if err != nil {
		return nil, err
	}
	defer l.remove()
	names, err := dataTree(l.lower, files, size)
	if err != nil {
		return nil, err
	}
	im, err := e.buildImage(ctx, "data", imageSpec{
		description: fmt.Sprintf("%d files of %d MiB (about 2:1 compressible), one gzip layer: the read benchmark's image", files, size>>20),
		args:        []string{"true"},
		tree:        func(context.Context, *env, string) (string, error) { return l.lower, nil },
	})
	if err != nil {
		return nil, err
	}
	if err := e.push(ctx, im.layout, e.strataProxy.Addr()+"/"+im.repo()+":latest"); err != nil {
		return nil, err
	}
	if _, _, err := e.awaitExpansion(ctx, im.repo(), im.layers); err != nil {
		return nil, err
	}
	ref := e.strataProxy.Addr() + "/" + im.repo() + ":latest"

	type key struct{ pattern, system string }
	samples := map[key][]float64{}
	cpuSamples := map[key][]float64{}
	bytesPer := map[string]int64{}
	pass := func(pattern, system, dir, root string) error {
		if err := dropCaches(); err != nil {
			return err
		}
		cpu0 := daemonCPU(root)
		var n int64
		start := time.Now()
		for _, name := range names {
			var k int64
			var err error
			if pattern == "sequential" {
				k, err = readSequential(filepath.Join(dir, name))
			} else {
				k, err = readRandom(filepath.Join(dir, name), size)
			}
			if err != nil {
				return fmt.Errorf("%s %s read of %s: %w", system, pattern, name, err)
			}
			n += k
		}
		el := time.Since(start)
		mbps := float64(n) / 1e6 / el.Seconds()
		samples[key{pattern, system}] = append(samples[key{pattern, system}], mbps)
		bytesPer[pattern] = n
		cpu := ""
		if root != "" {
			c := (daemonCPU(root) - cpu0).Seconds()
			cpuSamples[key{pattern, system}] = append(cpuSamples[key{pattern, system}], c)
			cpu = fmt.Sprintf(", node daemon CPU %.2f s", c)
		}
		e.logf("read %-10s %-15s %6.0f MB/s (%d bytes in %v%s)", pattern, system, mbps, n, el.Round(time.Millisecond), cpu)
		return nil
	}
	mount := func(root, dir string) error {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		out, err := e.strataCmd(ctx, root, "mount", "--plain-http", ref, dir).CombinedOutput()
		if err != nil {
			return fmt.Errorf("strata mount: %w\n%s", err, out)
		}
		return nil
	}
	umount := func(root, dir string) {
		if out, err := e.strataCmd(ctx, root, "umount", dir).CombinedOutput(); err != nil {
			e.logf("strata umount %s: %v %s", dir, err, out)
		}
		e.removeNode(root)
	}
	for i := range runs {
		// Sequential cold, then warm (every file now cached), then random warm.
		root := filepath.Join(e.disk, fmt.Sprintf("read-%d-a", i))
		mnt := filepath.Join(e.work, fmt.Sprintf("mnt-%d-a", i))
		if err := mount(root, mnt); err != nil {
			return nil, err
		}
		err := pass("sequential", readCold, mnt, root)
		if err == nil {
			// Warm: every file read and, once the node has completed
			// them in the background, whole in its cache.
			_, err = e.waitBackground(ctx, root)
		}
		if err == nil {
			err = pass("sequential", readWarm, mnt, root)
		}
		if err == nil {
			err = pass("random", readWarm, mnt, root)
		}
		umount(root, mnt)
		if err != nil {
			return nil, err
		}
		// Random cold on a fresh node.
		root = filepath.Join(e.disk, fmt.Sprintf("read-%d-b", i))
		mnt = filepath.Join(e.work, fmt.Sprintf("mnt-%d-b", i))
		if err := mount(root, mnt); err != nil {
			return nil, err
		}
		err = pass("random", readCold, mnt, root)
		umount(root, mnt)
		if err != nil {
			return nil, err
		}
		// The local passes come last: right after the image was built from
		// the same files, the host below this VM's disk still holds them,
		// which no drop_caches in here can drop.
		if err := pass("sequential", readLocal, l.merged, ""); err != nil {
			return nil, err
		}
		if err := pass("random", readLocal, l.merged, ""); err != nil {
			return nil, err
		}
	}
	var out []report.Read
	for _, pattern := range []string{"sequential", "random"} {
		base := report.Of(samples[key{pattern, readLocal}])
		for _, sys := range []string{readLocal, readCold, readWarm} {
			st := report.Of(samples[key{pattern, sys}])
			r := report.Read{Pattern: pattern, System: sys, MBps: st, Bytes: bytesPer[pattern], Samples: samples[key{pattern, sys}]}
			if c := cpuSamples[key{pattern, sys}]; len(c) > 0 {
				r.DaemonCPU = report.Of(c).Median
			}
			if base.Median > 0 {
				r.Ratio = st.Median / base.Median
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// readSequential reads file to the end in 1 MiB reads.
func readSequential(file string) (int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return io.CopyBuffer(io.Discard, onlyReader{f}, make([]byte, 1<<20))
}

type onlyReader struct{ io.Reader }

// readRandom reads randomRead distinct 4 KiB blocks of file at random
// (the same blocks in every pass), with readahead off for the file.
func readRandom(file string, size int64) (int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM)
	blocks := size / 4096
	perm := rand.New(rand.NewPCG(3, uint64(blocks))).Perm(int(blocks))
	buf := make([]byte, 4096)
	var n int64
	for _, b := range perm[:min(randomRead, len(perm))] {
		k, err := f.ReadAt(buf, int64(b)*4096)
		if err != nil && err != io.EOF {
			return n, err
		}
		n += int64(k)
	}
	return n, nil
}

// daemonCPU is the CPU time the node daemon of root has used so far (0
// when it is not running): a read served by FUSE passthrough costs the
// daemon nothing, one served from its frames costs decompression.
func daemonCPU(root string) time.Duration {
	if root == "" {
		return 0
	}
	b, err := os.ReadFile(filepath.Join(root, "daemon.pid"))
	if err != nil {
		return 0
	}
	st, err := os.ReadFile("/proc/" + strings.TrimSpace(string(b)) + "/stat")
	if err != nil {
		return 0
	}
	_, rest, ok := strings.Cut(string(st), ") ")
	if !ok {
		return 0
	}
	f := strings.Fields(rest)
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+stime) * time.Second / 100 // USER_HZ
}
