package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/bench/report"
	"github.com/strata-oci/strata/internal/testimage"
)

// The peer system, stargz-snapshotter, is a binary of its own module
// (bench/stargz, so that strata's module does not depend on it): it serves
// stargz's snapshotter as a containerd proxy plugin, converts images to
// eStargz and pulls them the way `ctr-remote image rpull` does.

// stargzVersion names the eStargz conversions in the cache; change it with
// bench/stargz's stargz-snapshotter version.
const stargzVersion = "stargz-snapshotter-v0.19.1"

// wantsStargz reports whether a stargz system is to be measured.
func (c Config) wantsStargz() bool {
	return c.wants(report.Stargz) || c.wants(report.StargzOptimized)
}

// stargzRepo is the repository of im's eStargz image for system sys in
// the CNCF registry.
func (im *image) stargzRepo(sys string) string {
	if sys == report.StargzOptimized {
		return im.repo() + "-estargz-optimized"
	}
	return im.repo() + "-estargz"
}

// buildStargz compiles the peer binary from bench/stargz.
func (e *env) buildStargz(ctx context.Context) error {
	e.stargz = filepath.Join(e.work, "bin", "strata-bench-stargz")
	e.logf("building the stargz-snapshotter peer (bench/stargz)")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", e.stargz, ".")
	cmd.Dir = filepath.Join(e.cfg.Repo, "bench", "stargz")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build bench/stargz: %w\n%s", err, out)
	}
	return nil
}

// prepareStargz converts im to eStargz, plain and optimized for its
// workload as the configuration asks, and pushes the conversions to the
// CNCF registry (before any shaping: none of this is timed). The
// optimized image puts first the files the workload read when its
// physical limit was measured (measured now if it was not).
func (e *env) prepareStargz(ctx context.Context, im *image, info *report.Image) error {
	if e.cfg.wants(report.StargzOptimized) && im.readPaths == nil {
		l, err := e.unpackLocal(ctx, im.Name, im.rootfs)
		if err != nil {
			return err
		}
		sr, err := e.measureReads(ctx, l, im.Args)
		l.remove()
		if err != nil {
			return err
		}
		im.readPaths = sr.paths
	}
	for _, sys := range []string{report.Stargz, report.StargzOptimized} {
		if !e.cfg.wants(sys) {
			continue
		}
		var prio []string
		if sys == report.StargzOptimized {
			prio = im.readPaths
		}
		layout, err := e.convertStargz(ctx, im, prio)
		if err != nil {
			return fmt.Errorf("converting %s to eStargz: %w", im.Name, err)
		}
		size, err := layoutLayerBytes(layout)
		if err != nil {
			return err
		}
		if err := e.push(ctx, layout, e.distProxy.Addr()+"/"+im.stargzRepo(sys)+":latest"); err != nil {
			return fmt.Errorf("push %s: %w", im.stargzRepo(sys), err)
		}
		if im.stargzBytes == nil {
			im.stargzBytes = map[string]int64{}
		}
		im.stargzBytes[sys] = size
		if sys == report.StargzOptimized {
			info.EStargzOptimizedBytes, info.PrioritizedFiles = size, len(prio)
			e.logf("image %s as optimized eStargz: %d bytes, %d files prioritized", im.Name, size, len(prio))
		} else {
			info.EStargzBytes = size
			e.logf("image %s as eStargz: %d bytes", im.Name, size)
		}
	}
	return nil
}

// convertStargz returns an OCI layout of im converted to eStargz with the
// prioritized files first (none: a plain eStargz), made with the peer
// binary and cached beside the test images (conversion at stargz's
// default, best gzip compression takes a while).
func (e *env) convertStargz(ctx context.Context, im *image, prio []string) (string, error) {
	src, err := os.ReadFile(filepath.Join(im.layout, ocispec.ImageIndexFile))
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s", stargzVersion, src, strings.Join(prio, "\n"))
	dir := filepath.Join(testimage.DefaultCacheDir, "estargz", hex.EncodeToString(h.Sum(nil))[:24])
	if _, err := os.Stat(filepath.Join(dir, ocispec.ImageIndexFile)); err == nil {
		return dir, nil
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	defer os.RemoveAll(tmp)
	args := []string{"convert"}
	if len(prio) > 0 {
		list := filepath.Join(e.work, im.Name+".prioritized")
		if err := os.WriteFile(list, []byte(strings.Join(prio, "\n")+"\n"), 0o644); err != nil {
			return "", err
		}
		args = append(args, "-prioritized", list)
	}
	t0 := time.Now()
	if err := run(ctx, e.stargz, append(args, im.layout, tmp)...); err != nil {
		return "", err
	}
	e.logf("converted %s to eStargz in %s", im.Name, time.Since(t0).Round(time.Second))
	return dir, os.Rename(tmp, dir)
}

// layoutLayerBytes is the total size of the layers of the only image in
// an OCI layout.
func layoutLayerBytes(dir string) (int64, error) {
	var idx ocispec.Index
	if err := readJSONFile(filepath.Join(dir, ocispec.ImageIndexFile), &idx); err != nil {
		return 0, err
	}
	if len(idx.Manifests) != 1 {
		return 0, fmt.Errorf("%s: %d manifests", dir, len(idx.Manifests))
	}
	var mf ocispec.Manifest
	d := idx.Manifests[0].Digest
	if err := readJSONFile(filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded()), &mf); err != nil {
		return 0, err
	}
	var n int64
	for _, l := range mf.Layers {
		n += l.Size
	}
	return n, nil
}

func readJSONFile(file string, v any) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// stargzRun measures stargz-snapshotter: a fresh snapshotter (its root on
// the node disk) and a fresh containerd with it as the proxy plugin
// "stargz", both started before the clock; then, timed like containerd's
// pull and run, an rpull of the eStargz image of system sys and
// `ctr run --snapshotter stargz`.
func (e *env) stargzRun(ctx context.Context, im *image, sys, id string) (s report.Sample) {
	ctx, cancel := context.WithTimeout(ctx, sampleTimeout)
	defer cancel()
	// Short: the ids name unix sockets, whose paths are at most 107 bytes.
	id = map[string]string{report.Stargz: "sz-", report.StargzOptimized: "szo-"}[sys] + id
	root := filepath.Join(e.disk, id)
	sock := filepath.Join(e.work, id+".sock")
	logFile := filepath.Join(e.work, id+".log")
	sn, err := e.startStargz(ctx, root, sock, logFile)
	if err != nil {
		s.Error = err.Error()
		return s
	}
	defer func() {
		stop(sn, 15*time.Second)
		umountBelow(root)
		os.RemoveAll(root)
		os.Remove(sock)
	}()
	c, err := e.startContainerd(ctx, id, fmt.Sprintf("\n[proxy_plugins]\n  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = %q\n", sock))
	if err != nil {
		s.Error = err.Error()
		return s
	}
	name := fmt.Sprintf("bench-%d-%s", os.Getpid(), id)
	started := ""
	defer func() { e.stopContainerd(c, started) }()
	defer func() {
		if s.Error != "" {
			b, _ := os.ReadFile(logFile)
			s.Error += "\nstargz snapshotter log:\n" + tailString(string(b), 1500)
		}
	}()
	ref := e.distProxy.Addr() + "/" + im.stargzRepo(sys) + ":latest"
	m := e.begin(ctx)
	defer func() { m.end(ctx, &s) }()
	rpull := exec.CommandContext(ctx, e.stargz, "rpull", "-address", c.sock, ref)
	if out, err := rpull.CombinedOutput(); err != nil {
		s.Error = fmt.Sprintf("rpull: %v\n%s", err, tailString(string(out), 2000))
		return s
	}
	started = name
	args := append([]string{"-a", c.sock, "run", "--rm", "--snapshotter", "stargz", ref, name}, im.Args...)
	first, total, err := firstLine(m.start, exec.CommandContext(ctx, "ctr", args...), im.Want)
	s.FirstLine, s.Total = first, total
	if err != nil {
		s.Error = err.Error()
	}
	return s
}

// startStargz starts the stargz snapshotter on root, serving on sock.
func (e *env) startStargz(ctx context.Context, root, sock, logFile string) (*exec.Cmd, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child has its own descriptor
	cmd := exec.Command(e.stargz, "serve", "-address", sock, "-root", root, "-log-level", "info")
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("stargz snapshotter: %w", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return cmd, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			stop(cmd, 5*time.Second)
			b, _ := os.ReadFile(logFile)
			return nil, fmt.Errorf("stargz snapshotter did not start:\n%s", tailString(string(b), 2000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func init() {
	notes = append(notes, "stargz-snapshotter (v0.19.1, default configuration) reads its eStargz images from the CNCF registry; after 5 s without on-demand reads it fetches whole layers in the background, which counts in its bytes over the link until the workload exits. Its optimized images prioritize the files the workload read when the physical limit was measured (strace and mincore), in the order it opened them.")
}
