package remote

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"

	"github.com/opencontainers/go-digest"
)

// Docker Hub's names: references say docker.io, the API lives elsewhere.
const (
	DockerHub    = "docker.io"
	dockerHubAPI = "registry-1.docker.io"
)

// ErrInvalidReference is wrapped by every error of ParseReference.
var ErrInvalidReference = errors.New("invalid reference")

// Repository names a repository in a registry.
type Repository struct {
	// Registry is the registry's host[:port] as written in references;
	// Docker Hub is "docker.io".
	Registry string
	// Name is the repository's path in the registry ("library/debian").
	Name string
}

// String returns "registry/name".
func (r Repository) String() string { return r.Registry + "/" + r.Name }

// scope is the token scope that pulls from r.
func (r Repository) scope() string { return "repository:" + r.Name + ":pull" }

// Reference names an image: a repository and a tag, a digest, or both.
// When both are set the digest decides what is fetched.
type Reference struct {
	Repository
	Tag    string
	Digest digest.Digest
}

// String returns the canonical form "registry/name[:tag][@digest]".
func (r Reference) String() string {
	s := r.Repository.String()
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest.String()
	}
	return s
}

// Identifier is what the manifest endpoint is asked for: the digest if there
// is one, else the tag.
func (r Reference) Identifier() string {
	if r.Digest != "" {
		return r.Digest.String()
	}
	return r.Tag
}

// The grammar of distribution/reference.
var (
	pathComponentRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$`)
	tagRE           = regexp.MustCompile(`^[\w][\w.-]{0,127}$`)
	hostLabelRE     = regexp.MustCompile(`^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])$`)
	portRE          = regexp.MustCompile(`^[0-9]+$`)
	hex64RE         = regexp.MustCompile(`^[a-f0-9]{64}$`)
)

const maxNameLength = 255

// ParseReference parses a docker-style image reference:
//
//	debian                      → docker.io/library/debian:latest
//	user/app:1.0                → docker.io/user/app:1.0
//	localhost:5000/foo/bar:tag  → registry localhost:5000, repository foo/bar
//	host/repo@sha256:…          → by digest, no tag
//	repo:tag@sha256:…           → tag kept for display, digest decides
//
// The first path component is a registry when it contains "." or ":", is
// "localhost", or has upper-case letters; otherwise the registry is Docker
// Hub, where one-component names live under "library/".
func ParseReference(s string) (Reference, error) {
	ref, err := parseReference(s)
	if err != nil {
		return Reference{}, fmt.Errorf("%w %q: %s", ErrInvalidReference, s, err)
	}
	return ref, nil
}

func parseReference(s string) (Reference, error) {
	var ref Reference
	if s == "" {
		return ref, errors.New("empty reference")
	}
	name := s
	if i := strings.IndexByte(s, '@'); i >= 0 {
		d, err := digest.Parse(s[i+1:])
		if err != nil {
			return ref, fmt.Errorf("bad digest: %v", err)
		}
		ref.Digest = d
		name = s[:i]
	}
	// A tag follows the last ':' after the last '/' (a ':' before it is a port).
	if i := strings.LastIndexByte(name, ':'); i >= 0 && i > strings.LastIndexByte(name, '/') {
		tag := name[i+1:]
		if !tagRE.MatchString(tag) {
			return ref, fmt.Errorf("bad tag %q", tag)
		}
		ref.Tag = tag
		name = name[:i]
	}
	if name == "" {
		return ref, errors.New("empty repository name")
	}
	registry, path := DockerHub, name
	if i := strings.IndexByte(name, '/'); i >= 0 {
		first := name[:i]
		if strings.ContainsAny(first, ".:") || first == "localhost" || strings.ToLower(first) != first {
			registry, path = first, name[i+1:]
			if err := validHost(registry); err != nil {
				return ref, err
			}
		}
	}
	if registry == "index.docker.io" || registry == dockerHubAPI {
		registry = DockerHub
	}
	if hex64RE.MatchString(path) {
		return ref, errors.New("a 64-character hexadecimal repository name is ambiguous with an image ID")
	}
	if registry == DockerHub && !strings.Contains(path, "/") {
		path = "library/" + path
	}
	for _, c := range strings.Split(path, "/") {
		if !pathComponentRE.MatchString(c) {
			if strings.ToLower(c) == c || !pathComponentRE.MatchString(strings.ToLower(c)) {
				return ref, fmt.Errorf("bad repository name component %q", c)
			}
			return ref, errors.New("repository name must be lowercase")
		}
	}
	if len(registry)+1+len(path) > maxNameLength {
		return ref, fmt.Errorf("name is longer than %d characters", maxNameLength)
	}
	ref.Registry, ref.Name = registry, path
	if ref.Tag == "" && ref.Digest == "" {
		ref.Tag = "latest"
	}
	return ref, nil
}

// validHost checks a registry host[:port]; IPv6 addresses go in brackets.
func validHost(h string) error {
	host, port := h, ""
	if strings.HasPrefix(h, "[") {
		end := strings.IndexByte(h, ']')
		if end < 0 {
			return fmt.Errorf("bad registry host %q", h)
		}
		host, port = h[1:end], h[end+1:]
		if ip := net.ParseIP(host); ip == nil || ip.To4() != nil {
			return fmt.Errorf("bad IPv6 address in registry host %q", h)
		}
		if port != "" {
			p, ok := strings.CutPrefix(port, ":")
			if !ok || !portRE.MatchString(p) {
				return fmt.Errorf("bad port in registry host %q", h)
			}
		}
		return nil
	}
	if i := strings.IndexByte(h, ':'); i >= 0 {
		host, port = h[:i], h[i+1:]
		if !portRE.MatchString(port) {
			return fmt.Errorf("bad port in registry host %q", h)
		}
	}
	for _, l := range strings.Split(host, ".") {
		if !hostLabelRE.MatchString(l) {
			return fmt.Errorf("bad registry host %q", h)
		}
	}
	return nil
}

// APIHost is the host[:port] that serves registry's API (Docker Hub's is
// not "docker.io").
func APIHost(registry string) string { return apiHost(registry) }

// apiHost is the host the distribution API of registry is reached at.
func apiHost(registry string) string {
	if registry == DockerHub {
		return dockerHubAPI
	}
	return registry
}

// IsLoopback reports whether a registry host[:port] is a loopback address
// ("localhost", 127.0.0.0/8, ::1). A caller may use it to reach local test
// registries over plain HTTP: Options{Hosts: PlainHosts(IsLoopback)}.
func IsLoopback(registry string) bool {
	host := registry
	if h, _, err := net.SplitHostPort(registry); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
