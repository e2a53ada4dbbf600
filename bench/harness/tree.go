package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/strata-oci/strata/bench/report"
)

// Tree-walk systems.
const (
	treeLocalCold = "local overlayfs, cold"
	treeLocalWarm = "local overlayfs, warm"
	treeCold      = "strata cold"
	treeWarm      = "strata warm"
)

// treeBench walks the /usr of im (`tar -cf - usr`, every file opened and
// read, the archive counted, not stored) through a fresh `strata mount`
// (cold: nothing cached, every byte over the link) and again once the node
// has every file cached and the page cache holds them (warm: what a tree
// walk costs when nothing needs fetching), against a local overlayfs over
// an unpacked copy, cold (page cache dropped) and warm.
func (e *env) treeBench(ctx context.Context, im *image, runs int) ([]report.Read, error) {
	e.logf("tree walk: %s of %s, %d runs", "tar", im.Name, runs)
	l, err := e.unpackLocal(ctx, "tree-"+im.Name, im.rootfs)
	if err != nil {
		return nil, err
	}
	defer l.remove()
	ref := e.strataProxy.Addr() + "/" + im.repo() + ":latest"
	sub, label := "usr", "tar of /usr"
	if _, err := os.Stat(filepath.Join(im.rootfs, "usr")); err != nil {
		sub, label = ".", "tar of /" // an image without /usr (tiny)
	}
	samples := map[string][]float64{}
	cpu := map[string][]float64{}
	var size int64
	walk := func(system, dir, root string, record bool) error {
		cpu0 := daemonCPU(root)
		n, el, err := tarTree(ctx, dir, sub)
		if err != nil {
			return fmt.Errorf("%s: %w", system, err)
		}
		if !record {
			return nil
		}
		size = n
		mbps := float64(n) / 1e6 / el.Seconds()
		samples[system] = append(samples[system], mbps)
		c := ""
		if root != "" {
			d := (daemonCPU(root) - cpu0).Seconds()
			cpu[system] = append(cpu[system], d)
			c = fmt.Sprintf(", node daemon CPU %.2f s", d)
		}
		e.logf("tree walk %-22s %6.0f MB/s (%d bytes in %v%s)", system, mbps, n, el.Round(time.Millisecond), c)
		return nil
	}
	for i := range runs {
		root := filepath.Join(e.disk, fmt.Sprintf("tree-%d", i))
		mnt := filepath.Join(e.work, fmt.Sprintf("tree-mnt-%d", i))
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			return nil, err
		}
		if out, err := e.strataCmd(ctx, root, "mount", "--plain-http", ref, mnt).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("strata mount: %w\n%s", err, out)
		}
		err := dropCaches()
		if err == nil {
			err = walk(treeCold, mnt, root, true)
		}
		if err == nil {
			_, err = e.waitBackground(ctx, root)
		}
		if err == nil {
			err = walk(treeWarm, mnt, root, false) // fills the page cache
		}
		if err == nil {
			err = walk(treeWarm, mnt, root, true)
		}
		if out, uerr := e.strataCmd(ctx, root, "umount", mnt).CombinedOutput(); uerr != nil {
			e.logf("strata umount %s: %v %s", mnt, uerr, out)
		}
		e.removeNode(root)
		if err != nil {
			return nil, err
		}
		if err := dropCaches(); err != nil {
			return nil, err
		}
		if err := walk(treeLocalCold, l.merged, "", true); err != nil {
			return nil, err
		}
		if err := walk(treeLocalWarm, l.merged, "", true); err != nil {
			return nil, err
		}
	}
	var out []report.Read
	base := map[string]string{treeCold: treeLocalCold, treeWarm: treeLocalWarm}
	for _, sys := range []string{treeLocalCold, treeCold, treeLocalWarm, treeWarm} {
		st := report.Of(samples[sys])
		r := report.Read{Pattern: label, System: sys, MBps: st, Bytes: size, Samples: samples[sys]}
		if c := cpu[sys]; len(c) > 0 {
			r.DaemonCPU = report.Of(c).Median
		}
		if b := report.Of(samples[base[sys]]); base[sys] != "" && b.Median > 0 {
			r.Ratio = st.Median / b.Median
		}
		out = append(out, r)
	}
	return out, nil
}

// tarTree runs `tar -cf - sub` in dir into a pipe (so that GNU tar reads
// every file, which it skips when writing to /dev/null) and returns the
// archive's size and the time it took.
func tarTree(ctx context.Context, dir, sub string) (int64, time.Duration, error) {
	cmd := exec.CommandContext(ctx, "tar", "-C", dir, "-cf", "-", sub)
	var size int64
	cmd.Stdout = &countWriter{n: &size}
	var stderr []byte
	start := time.Now()
	out, err := cmd.StderrPipe()
	if err != nil {
		return 0, 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	buf := make([]byte, 4096)
	for {
		n, rerr := out.Read(buf)
		if len(stderr) < 4096 {
			stderr = append(stderr, buf[:n]...)
		}
		if rerr != nil {
			break
		}
	}
	err = cmd.Wait()
	el := time.Since(start)
	if err != nil {
		return 0, 0, fmt.Errorf("tar of %s/%s: %w: %s", dir, sub, err, stderr)
	}
	return size, el, nil
}
