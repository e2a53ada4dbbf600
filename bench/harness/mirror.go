package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/strata-oci/strata/bench/report"
)

// strataMirror measures two starts of im through a fresh strata mirror of
// the CNCF registry: the first request for the image (the mirror fetches
// it from its upstream over its own link and expands it), then a start on
// another fresh node once the first one is over. The nodes name the image
// as it is in the CNCF registry and find the mirror in a hosts.toml.
func (e *env) strataMirror(ctx context.Context, im *image, id string) (first, second report.Sample) {
	fail := func(err error) (report.Sample, report.Sample) {
		s := report.Sample{Error: err.Error()}
		return s, report.Sample{Error: "no mirror: " + err.Error()}
	}
	stop, err := e.startMirror(ctx, id)
	if err != nil {
		return fail(err)
	}
	defer stop()
	hosts := filepath.Join(e.work, "hosts-"+id)
	dir := filepath.Join(hosts, e.distProxy.Addr())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(err)
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
		e.distProxy.Addr(), e.mirrorProxy.Addr())
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		return fail(err)
	}
	defer os.RemoveAll(hosts)

	start := func(name string) report.Sample {
		root := filepath.Join(e.disk, "mirror-"+name+"-"+id)
		defer e.removeNode(root) // stores the profile it recorded
		_, down0, _ := e.upstreamProxy.Bytes()
		s, stderr := e.strataRunOut(ctx, root, e.distProxy.Addr(), im, "--hosts-dir", hosts)
		_, down1, _ := e.upstreamProxy.Bytes()
		if s.Error == "" && !strings.Contains(stderr, "lazy: layer mounts") {
			s.Error = "the node did not start lazily through the mirror: " + tailString(stderr, 500)
		}
		e.logf("  %s mirror %s start: %s; the mirror fetched %s from its upstream meanwhile",
			im.Name, name, strings.TrimSpace(lastLine(stderr)), report.MB(down1-down0))
		return s
	}
	first = start("first")
	if first.Error != "" {
		return first, report.Sample{Error: "the first start failed"}
	}
	return first, start("second")
}

// startMirror starts a strata registry serving as a pull-through mirror
// of the CNCF registry, in the registries' namespace at port 5002 (the
// node reaches it through mirrorProxy) with a fresh store, its upstream
// reached through upstreamProxy; stop stops it and removes its store.
func (e *env) startMirror(ctx context.Context, id string) (func(), error) {
	root := filepath.Join(e.work, "mirror-"+id)
	logFile := filepath.Join(e.work, "mirror-"+id+".log")
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("nsenter", "--net="+e.net.RegistryNS(), e.strata, "--log-level", "warn",
		"registry", "serve", "--addr", e.net.RegistryIP+":5002", "--root", root,
		"--upstream", "http://"+e.upstreamProxy.Addr())
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("mirror: %w", err)
	}
	stopMirror := func() {
		stop(cmd, 10*time.Second)
		f.Close()
		os.RemoveAll(root)
		if !e.cfg.Keep {
			os.Remove(logFile)
		}
	}
	if err := waitHTTP(ctx, "http://"+e.mirrorProxy.Addr()+"/v2/", 20*time.Second); err != nil {
		stopMirror()
		b, _ := os.ReadFile(logFile)
		return nil, fmt.Errorf("mirror: %w\n%s", err, b)
	}
	return stopMirror, nil
}
