package container

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	rspec "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/strata-oci/strata/internal/overlay"
)

// Containers keeps container state under a directory of the node root:
//
//	<dir>/<id>/meta.json     Info
//	<dir>/<id>/config.json   the OCI runtime config (the bundle)
//	<dir>/<id>/rootfs/       the union mount (overlay: image layers + upper)
//	<dir>/<id>/upper, work/  the container's writable layer
//	<dir>/<id>/log           stdout and stderr of a detached container
//	<dir>/<id>/runc.log      runc's own log (JSON) of the container's start
//
// runc's own state lives in <dir>/../runc (its --root).
type Containers struct {
	Dir  string
	Runc string // runc binary (default "runc")
}

// Info describes a container.
type Info struct {
	ID       string    `json:"id"`
	Name     string    `json:"name,omitempty"`
	Ref      string    `json:"ref"`
	Mode     string    `json:"mode"`
	Command  []string  `json:"command"`
	Created  time.Time `json:"created"`
	Detached bool      `json:"detached"`
	// Status is filled in by List from runc: created, running, stopped.
	Status string `json:"status,omitempty"`
}

// ErrNotFound: no such container.
var ErrNotFound = errors.New("no such container")

func (c Containers) runc() string {
	if c.Runc != "" {
		return c.Runc
	}
	return "runc"
}

func (c Containers) runcRoot() string { return filepath.Join(filepath.Dir(c.Dir), "runc") }

// NewID returns a random container id.
func NewID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Prepare creates the container's directories and mounts its root
// filesystem: the image layers (lowers, top first) under a fresh upper dir.
// It returns the rootfs path.
func (c Containers) Prepare(info Info, lowers []string) (string, error) {
	dir := filepath.Join(c.Dir, info.ID)
	for _, d := range []string{"rootfs", "upper", "work"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return "", err
		}
	}
	if err := writeJSON(filepath.Join(dir, "meta.json"), info); err != nil {
		return "", err
	}
	rootfs := filepath.Join(dir, "rootfs")
	plan, err := overlay.Plan(overlay.Spec{Lowers: lowers, Upper: filepath.Join(dir, "upper"), Work: filepath.Join(dir, "work")})
	if err != nil {
		return "", err
	}
	if err := plan.Do(rootfs); err != nil {
		return "", err
	}
	return rootfs, nil
}

// WriteSpec writes the bundle's config.json.
func (c Containers) WriteSpec(id string, s *rspec.Spec) error {
	return writeJSON(filepath.Join(c.Dir, id, "config.json"), s)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Stdio is where a foreground container's standard streams go.
type Stdio struct {
	In       io.Reader
	Out, Err io.Writer
}

// Run runs container id in the foreground and returns its exit code.
// Signals the calling process receives are passed to the container. When
// runc cannot start the container's command, Run returns a *StartError.
func (c Containers) Run(ctx context.Context, id string, stdio Stdio) (int, error) {
	log := c.runcLog(id)
	os.Remove(log)
	cmd := exec.Command(c.runc(), c.runcArgs(log, "run", "--bundle", filepath.Join(c.Dir, id), id)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdio.In, stdio.Out, &runcStderr{w: stdio.Err, log: log}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start runc: %w", err)
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				// runc forwards what it receives to the container process.
				cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	err := cmd.Wait()
	close(done)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		// runc exits 1 when it fails itself, and logs why; a container's
		// own exit status leaves no error in runc's log.
		if msgs := runcLogErrors(log); ee.ExitCode() == 1 && len(msgs) > 0 {
			return 0, startError(msgs[len(msgs)-1])
		}
		return ee.ExitCode(), nil
	}
	if err != nil {
		return 0, fmt.Errorf("runc run: %w", err)
	}
	return 0, nil
}

// Start runs container id detached; its output goes to its log file. When
// runc cannot start the container's command, Start returns a *StartError.
func (c Containers) Start(ctx context.Context, id string) error {
	logf, err := os.OpenFile(filepath.Join(c.Dir, id, "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return err
	}
	defer logf.Close()
	log := c.runcLog(id)
	os.Remove(log)
	cmd := exec.CommandContext(ctx, c.runc(), c.runcArgs(log, "run", "--detach", "--bundle", filepath.Join(c.Dir, id), id)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Run(); err != nil {
		if msgs := runcLogErrors(log); len(msgs) > 0 {
			return startError(msgs[len(msgs)-1])
		}
		b, _ := os.ReadFile(filepath.Join(c.Dir, id, "log"))
		return fmt.Errorf("runc run --detach: %w: %s", err, lastLine(string(b)))
	}
	return nil
}

// runcLog is where runc logs (JSON) what it does for container id.
func (c Containers) runcLog(id string) string { return filepath.Join(c.Dir, id, "runc.log") }

// runcArgs are runc's global flags, then args.
func (c Containers) runcArgs(log string, args ...string) []string {
	return append([]string{"--root", c.runcRoot(), "--log", log, "--log-format", "json"}, args...)
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// Get returns container id's info (id may be a name or an id prefix).
func (c Containers) Get(ctx context.Context, idOrName string) (*Info, error) {
	all, err := c.List(ctx)
	if err != nil {
		return nil, err
	}
	var match []*Info
	for _, in := range all {
		if in.ID == idOrName || in.Name == idOrName {
			return in, nil
		}
		if len(idOrName) >= 4 && strings.HasPrefix(in.ID, idOrName) {
			match = append(match, in)
		}
	}
	if len(match) == 1 {
		return match[0], nil
	}
	if len(match) > 1 {
		return nil, fmt.Errorf("%q matches %d containers", idOrName, len(match))
	}
	return nil, fmt.Errorf("%w: %s", ErrNotFound, idOrName)
}

// List returns every container with its runc status.
func (c Containers) List(ctx context.Context) ([]*Info, error) {
	ents, err := os.ReadDir(c.Dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var out []*Info
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(c.Dir, e.Name(), "meta.json"))
		if err != nil {
			continue
		}
		var in Info
		if json.Unmarshal(b, &in) != nil {
			continue
		}
		in.Status = c.status(ctx, in.ID)
		out = append(out, &in)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

func (c Containers) status(ctx context.Context, id string) string {
	out, err := exec.CommandContext(ctx, c.runc(), "--root", c.runcRoot(), "state", id).Output()
	if err != nil {
		return "stopped"
	}
	var st struct{ Status string }
	if json.Unmarshal(out, &st) != nil {
		return "unknown"
	}
	return st.Status
}

// Stop sends SIGTERM, and SIGKILL after timeout.
func (c Containers) Stop(ctx context.Context, id string, timeout time.Duration) error {
	if c.status(ctx, id) != "running" {
		return nil
	}
	exec.CommandContext(ctx, c.runc(), "--root", c.runcRoot(), "kill", id, "TERM").Run()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if c.status(ctx, id) != "running" {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := exec.CommandContext(ctx, c.runc(), "--root", c.runcRoot(), "kill", id, "KILL").CombinedOutput(); err != nil && c.status(ctx, id) == "running" {
		return fmt.Errorf("kill %s: %v: %s", id, err, out)
	}
	for i := 0; i < 50 && c.status(ctx, id) == "running"; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

// Remove deletes container id: runc state, root filesystem mount, files.
// A running container needs force.
func (c Containers) Remove(ctx context.Context, id string, force bool) error {
	st := c.status(ctx, id)
	if st == "running" && !force {
		return fmt.Errorf("container %s is running: stop it first or force", id)
	}
	args := []string{"--root", c.runcRoot(), "delete"}
	if force {
		args = append(args, "--force")
	}
	exec.CommandContext(ctx, c.runc(), append(args, id)...).Run()
	dir := filepath.Join(c.Dir, id)
	if err := overlay.Unmount(filepath.Join(dir, "rootfs"), false); err != nil {
		overlay.Unmount(filepath.Join(dir, "rootfs"), true)
	}
	return os.RemoveAll(dir)
}

// LogPath returns the log file of a detached container.
func (c Containers) LogPath(id string) string { return filepath.Join(c.Dir, id, "log") }
