package container_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/container"
)

func rootfs(t *testing.T) string {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
	os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:33::/var/www:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc/group"), []byte("root:x:0:\napp:x:1000:\nstaff:x:50:app\nwww:x:33:\n"), 0o644)
	return dir
}

func TestSpecProcess(t *testing.T) {
	root := rootfs(t)
	img := ocispec.ImageConfig{
		Entrypoint: []string{"/entry"},
		Cmd:        []string{"default"},
		Env:        []string{"PATH=/bin", "A=1"},
		WorkingDir: "/srv",
		User:       "app",
	}
	tests := []struct {
		name      string
		opts      container.RunOptions
		args, env []string
		cwd       string
		uid, gid  uint32
		extraGids []uint32
	}{
		{"image defaults", container.RunOptions{}, []string{"/entry", "default"}, []string{"PATH=/bin", "A=1", "HOME=/home/app"}, "/srv", 1000, 1000, []uint32{50}},
		{"args replace cmd", container.RunOptions{Args: []string{"x", "y"}}, []string{"/entry", "x", "y"}, nil, "/srv", 1000, 1000, nil},
		{"entrypoint override drops cmd", container.RunOptions{Entrypoint: []string{"/bin/sh"}}, []string{"/bin/sh"}, nil, "/srv", 1000, 1000, nil},
		{"entrypoint and args", container.RunOptions{Entrypoint: []string{"/bin/sh"}, Args: []string{"-c", "exit 7"}}, []string{"/bin/sh", "-c", "exit 7"}, nil, "/srv", 1000, 1000, nil},
		{"env override", container.RunOptions{Env: []string{"A=2", "B=3"}}, nil, []string{"PATH=/bin", "A=2", "B=3", "HOME=/home/app"}, "/srv", 1000, 1000, nil},
		{"workdir", container.RunOptions{Workdir: "/tmp/../work"}, nil, nil, "/work", 1000, 1000, nil},
		{"user by id", container.RunOptions{User: "33"}, nil, nil, "/srv", 33, 33, nil},
		{"user and group by name", container.RunOptions{User: "web:staff"}, nil, nil, "/srv", 33, 50, nil},
		{"unknown uid is allowed", container.RunOptions{User: "4242:4243"}, nil, nil, "/srv", 4242, 4243, nil},
		{"root", container.RunOptions{User: "root"}, nil, nil, "/srv", 0, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := container.Spec(img, root, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			p := s.Process
			if tc.args != nil {
				if d := cmp.Diff(tc.args, p.Args); d != "" {
					t.Errorf("args (-want +got):\n%s", d)
				}
			}
			if tc.env != nil {
				if d := cmp.Diff(tc.env, p.Env); d != "" {
					t.Errorf("env (-want +got):\n%s", d)
				}
			}
			if p.Cwd != tc.cwd || p.User.UID != tc.uid || p.User.GID != tc.gid {
				t.Errorf("cwd %q uid %d gid %d", p.Cwd, p.User.UID, p.User.GID)
			}
			if tc.extraGids != nil {
				if d := cmp.Diff(tc.extraGids, p.User.AdditionalGids); d != "" {
					t.Errorf("additional gids (-want +got):\n%s", d)
				}
			}
			if s.Root.Path != root {
				t.Errorf("root %q", s.Root.Path)
			}
		})
	}
}

func TestSpecErrors(t *testing.T) {
	root := rootfs(t)
	tests := []struct {
		name string
		img  ocispec.ImageConfig
		opts container.RunOptions
	}{
		{"no command", ocispec.ImageConfig{}, container.RunOptions{}},
		{"unknown user", ocispec.ImageConfig{Cmd: []string{"x"}}, container.RunOptions{User: "nobody-here"}},
		{"unknown group", ocispec.ImageConfig{Cmd: []string{"x"}}, container.RunOptions{User: "app:nogroup"}},
		{"relative workdir", ocispec.ImageConfig{Cmd: []string{"x"}}, container.RunOptions{Workdir: "rel"}},
		{"bad volume", ocispec.ImageConfig{Cmd: []string{"x"}}, container.RunOptions{Volumes: []string{"relative:/x"}}},
		{"volume over root", ocispec.ImageConfig{Cmd: []string{"x"}}, container.RunOptions{Volumes: []string{"/tmp:/"}}},
		{"bad network", ocispec.ImageConfig{Cmd: []string{"x"}}, container.RunOptions{Network: "bridge"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := container.Spec(tc.img, root, tc.opts); !errors.Is(err, container.ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
		})
	}
}

// TestPasswdThroughSymlinkStaysInRootfs: an image whose /etc/passwd is a
// symlink to an absolute host path must not read the host's file.
func TestPasswdThroughSymlinkStaysInRootfs(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "etc"), 0o755)
	host := filepath.Join(t.TempDir(), "hostpasswd")
	os.WriteFile(host, []byte("hostuser:x:777:777::/:/bin/sh\n"), 0o644)
	os.Symlink(host, filepath.Join(dir, "etc/passwd"))
	if _, err := container.Spec(ocispec.ImageConfig{Cmd: []string{"x"}}, dir, container.RunOptions{User: "hostuser"}); !errors.Is(err, container.ErrInvalid) {
		t.Fatalf("user resolved through a symlink out of the rootfs: %v", err)
	}
}
