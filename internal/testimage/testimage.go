// Package testimage builds the real images strata's tests and benchmarks
// use: Debian root filesystems made with debootstrap from the Debian mirror
// this machine's apt uses (read from its sources at run time), turned into
// gzip layers by GNU tar, written as OCI image layouts.
package testimage

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// DefaultCacheDir keeps built root filesystems between test runs.
const DefaultCacheDir = "/var/cache/strata-test"

// Mirror returns the Debian mirror URI apt is configured with.
func Mirror() (string, error) {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	for _, f := range files {
		if uri := scanSources(f, true); uri != "" {
			return uri, nil
		}
	}
	files, _ = filepath.Glob("/etc/apt/sources.list.d/*.list")
	files = append([]string{"/etc/apt/sources.list"}, files...)
	for _, f := range files {
		if uri := scanSources(f, false); uri != "" {
			return uri, nil
		}
	}
	return "", errors.New("no Debian mirror in /etc/apt/sources.list{,.d}")
}

func scanSources(file string, deb822 bool) string {
	f, err := os.Open(file)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if deb822 {
			if v, ok := strings.CutPrefix(line, "URIs:"); ok {
				for _, u := range strings.Fields(v) {
					if strings.HasSuffix(strings.TrimRight(u, "/"), "/debian") {
						return u
					}
				}
			}
			continue
		}
		fields := strings.Fields(line)
		if len(fields) >= 3 && fields[0] == "deb" {
			for _, u := range fields[1:] {
				if strings.HasPrefix(u, "http") && strings.HasSuffix(strings.TrimRight(u, "/"), "/debian") {
					return u
				}
			}
		}
	}
	return ""
}

// Debian returns a root filesystem of Debian suite (minbase) with packages,
// built with debootstrap into cacheDir the first time and reused after.
func Debian(ctx context.Context, cacheDir, suite string, packages ...string) (string, error) {
	key := sha256.Sum256([]byte(suite + "\x00" + strings.Join(packages, ",")))
	dir := filepath.Join(cacheDir, "debian-"+suite+"-"+hex.EncodeToString(key[:6]))
	if _, err := os.Stat(filepath.Join(dir, "etc", "os-release")); err == nil {
		return dir, nil
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", fmt.Errorf("debootstrap is not installed: %w", err)
	}
	mirror, err := Mirror()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(cacheDir, ".build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	args := []string{"--variant=minbase"}
	if len(packages) > 0 {
		args = append(args, "--include="+strings.Join(packages, ","))
	}
	args = append(args, suite, tmp, mirror)
	out, err := exec.CommandContext(ctx, "debootstrap", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("debootstrap %s: %w\n%s", strings.Join(args, " "), err, tail(out))
	}
	// Downloaded packages and apt lists are not part of an image.
	for _, g := range []string{"var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*", "var/log/*.log"} {
		m, _ := filepath.Glob(filepath.Join(tmp, g))
		for _, p := range m {
			os.RemoveAll(p)
		}
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return dir, nil
}

func tail(b []byte) string {
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// Tar writes the tar stream of dir (GNU tar: sorted names, numeric owners,
// xattrs) to w, the way image builders make a layer of a root filesystem.
func Tar(ctx context.Context, dir string, w io.Writer) error {
	cmd := exec.CommandContext(ctx, "tar", "--sort=name", "--numeric-owner", "--xattrs", "--xattrs-include=*",
		"--format=posix", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
		"-C", dir, "-cf", "-", ".")
	cmd.Stdout = w
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("tar %s: %w: %s", dir, err, stderr.String())
	}
	return nil
}
