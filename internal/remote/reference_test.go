package remote_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/remote"
)

const (
	dgA = "sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)

func ref(registry, name, tag, dg string) remote.Reference {
	return remote.Reference{Repository: remote.Repository{Registry: registry, Name: name}, Tag: tag, Digest: digest.Digest(dg)}
}

func TestParseReference(t *testing.T) {
	tests := []struct {
		in      string
		want    remote.Reference
		wantStr string
		err     string // substring of the error; "" for success
	}{
		{in: "debian", want: ref("docker.io", "library/debian", "latest", ""), wantStr: "docker.io/library/debian:latest"},
		{in: "debian:bookworm", want: ref("docker.io", "library/debian", "bookworm", "")},
		{in: "user/app:1.0", want: ref("docker.io", "user/app", "1.0", "")},
		{in: "docker.io/debian", want: ref("docker.io", "library/debian", "latest", "")},
		{in: "index.docker.io/user/app", want: ref("docker.io", "user/app", "latest", "")},
		{in: "registry-1.docker.io/library/busybox:1", want: ref("docker.io", "library/busybox", "1", "")},
		{in: "localhost/foo", want: ref("localhost", "foo", "latest", "")},
		{in: "localhost:5000/foo/bar:tag", want: ref("localhost:5000", "foo/bar", "tag", ""), wantStr: "localhost:5000/foo/bar:tag"},
		{in: "127.0.0.1:39999/a/b/c", want: ref("127.0.0.1:39999", "a/b/c", "latest", "")},
		{in: "ghcr.io/org/img@" + dgA, want: ref("ghcr.io", "org/img", "", dgA), wantStr: "ghcr.io/org/img@" + dgA},
		{in: "quay.io/org/img:v1@" + dgA, want: ref("quay.io", "org/img", "v1", dgA), wantStr: "quay.io/org/img:v1@" + dgA},
		{in: "img@" + dgA, want: ref("docker.io", "library/img", "", dgA)},
		{in: "[::1]:5000/foo:x", want: ref("[::1]:5000", "foo", "x", "")},
		{in: "Registry/foo", want: ref("Registry", "foo", "latest", "")},
		{in: "a.b-c_d__e--f:T_a.g-9", want: ref("docker.io", "library/a.b-c_d__e--f", "T_a.g-9", "")},
		{in: "localhost:5000", want: ref("docker.io", "library/localhost", "5000", "")},
		{in: "my-registry.example.com:443/team/app:" + strings.Repeat("t", 128), want: ref("my-registry.example.com:443", "team/app", strings.Repeat("t", 128), "")},

		{in: "", err: "empty reference"},
		{in: ":tag", err: "empty repository name"},
		{in: "repo:", err: "bad tag"},
		{in: "repo@", err: "bad digest"},
		{in: "repo@sha256:abc", err: "bad digest"},
		{in: "repo@md5:" + hex[:32], err: "bad digest"},
		{in: "repo:bad tag", err: "bad tag"},
		{in: "repo:" + strings.Repeat("t", 129), err: "bad tag"},
		{in: "repo:.tag", err: "bad tag"},
		{in: "foo/Bar", err: "must be lowercase"},
		{in: "a//b", err: "bad repository name component"},
		{in: "/repo", err: "bad repository name component"},
		{in: "repo/", err: "bad repository name component"},
		{in: "-foo", err: "bad repository name component"},
		{in: "foo-", err: "bad repository name component"},
		{in: "foo..bar", err: "bad repository name component"},
		{in: hex, err: "ambiguous"},
		{in: "host:port/foo", err: "bad port"},
		{in: "-host.io/foo", err: "bad registry host"},
		{in: "[::1/foo", err: "bad registry host"},
		{in: "[1.2.3.4]/foo", err: "bad IPv6"},
		{in: "example.com/" + strings.Repeat("a", 250), err: "longer than 255"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := remote.ParseReference(tt.in)
			if tt.err != "" {
				if err == nil {
					t.Fatalf("ParseReference(%q) = %v, want error containing %q", tt.in, got, tt.err)
				}
				if !errors.Is(err, remote.ErrInvalidReference) || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ParseReference(%q) error = %v, want ErrInvalidReference containing %q", tt.in, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseReference(%q): %v", tt.in, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseReference(%q) mismatch (-want +got):\n%s", tt.in, diff)
			}
			if tt.wantStr != "" && got.String() != tt.wantStr {
				t.Errorf("String() = %q, want %q", got.String(), tt.wantStr)
			}
			// The canonical form parses back to the same reference.
			again, err := remote.ParseReference(got.String())
			if err != nil || again != got {
				t.Errorf("round trip of %q: %v, %v", got.String(), again, err)
			}
		})
	}
}

func TestIdentifier(t *testing.T) {
	if got := ref("r", "n", "t", "").Identifier(); got != "t" {
		t.Errorf("tag only: %q", got)
	}
	if got := ref("r", "n", "t", dgA).Identifier(); got != dgA {
		t.Errorf("tag and digest: %q", got)
	}
}

func TestIsLoopback(t *testing.T) {
	for in, want := range map[string]bool{
		"localhost": true, "localhost:5000": true, "127.0.0.1:80": true, "127.1.2.3": true,
		"[::1]:5000": true, "::1": true, "docker.io": false, "10.0.0.1:5000": false, "localhost.example.com": false,
	} {
		if got := remote.IsLoopback(in); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", in, got, want)
		}
	}
}
