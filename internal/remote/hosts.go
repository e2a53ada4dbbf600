package remote

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
)

// Capabilities are what an endpoint may be asked for, as in containerd's
// hosts.toml: pull (blobs and manifests by digest, and strata's routes),
// resolve (manifests by tag), push (every write).
type Capabilities uint8

const (
	CapPull Capabilities = 1 << iota
	CapResolve
	CapPush

	CapAll = CapPull | CapResolve | CapPush
)

// An Endpoint is one host serving a registry's API: a mirror, or the
// registry's own server.
type Endpoint struct {
	// Scheme is "http" or "https"; Host is host[:port].
	Scheme, Host string
	// Path is the API root, "/v2" unless hosts.toml overrides it
	// (override_path).
	Path string
	// Capabilities limits what is asked of this endpoint.
	Capabilities Capabilities
	// Header is sent with every request to the endpoint.
	Header http.Header
	// Client sends the endpoint's requests when it needs TLS settings of
	// its own (ca, client, skip_verify); nil is the Client's transport.
	Client *http.Client
	// Mirror: the endpoint is not the registry's own server. Its requests
	// carry ?ns=<registry>, as containerd's do, and it is asked for
	// credentials under its own host name.
	Mirror bool
}

// A Host is how the client reaches one registry.
type Host struct {
	// PlainHTTP: the registry's own server is reached over HTTP, not HTTPS.
	PlainHTTP bool
	// Endpoints are the hosts tried in order (mirrors first, the server
	// last), from containerd's hosts directory; nil is the registry's own
	// server alone, reached as PlainHTTP says.
	Endpoints []Endpoint
	// Err is why the registry's host configuration cannot be used (a CA
	// file that cannot be read, a malformed hosts.toml): every request to
	// the registry fails with it rather than going elsewhere.
	Err error
}

// Hosts resolves registries (host[:port] as in references) to how they are
// reached: the one place a client asks. A node has one, shared by every
// pull and every lazy read, so a registry a user reached with --plain-http
// is reached the same way by the frames its layers fetch later. The zero
// value (and nil) reaches every registry over HTTPS. It is safe for
// concurrent use.
type Hosts struct {
	// Dir is containerd's registry host configuration directory
	// (config_path, usually /etc/containerd/certs.d): <host>/hosts.toml,
	// <host_port_>/hosts.toml or _default/hosts.toml, read with
	// containerd's own parser, so mirrors, server, capabilities, ca,
	// client, skip_verify, header and override_path mean what they mean
	// to containerd. "" reads none.
	Dir string
	// Config, if set, is the answer for a registry without a hosts
	// directory (IsLoopback for test registries, for instance), asked for
	// the registries AllowPlainHTTP has not marked.
	Config func(registry string) Host

	mu    sync.RWMutex
	plain map[string]bool
	dirs  map[string]*dirHosts // by registry
}

// dirHosts is a registry's configuration read from Dir, kept while the
// files it came from are unchanged (re-checked at most every
// hostsRecheck), so that connections of its HTTP clients are reused.
type dirHosts struct {
	checked time.Time
	stamp   string // the hosts.toml's path, size and modification time
	host    Host
	ok      bool // a directory applies
}

const hostsRecheck = 2 * time.Second

// PlainHosts returns Hosts that reach the registries for which plain
// returns true over plain HTTP, for instance IsLoopback.
func PlainHosts(plain func(registry string) bool) *Hosts {
	return &Hosts{Config: func(r string) Host { return Host{PlainHTTP: plain(r)} }}
}

// Lookup returns how registry is reached.
func (h *Hosts) Lookup(registry string) Host {
	if h == nil {
		return Host{}
	}
	h.mu.RLock()
	plain := h.plain[registry]
	h.mu.RUnlock()
	if h.Dir != "" {
		if host, ok := h.fromDir(registry, plain); ok {
			return host
		}
	}
	if plain {
		return Host{PlainHTTP: true}
	}
	if h.Config != nil {
		return h.Config(registry)
	}
	return Host{}
}

// fromDir returns the configuration of registry from Dir, if a directory
// applies to it.
func (h *Hosts) fromDir(registry string, plain bool) (Host, bool) {
	h.mu.RLock()
	d := h.dirs[registry]
	h.mu.RUnlock()
	now := time.Now()
	if d != nil && now.Sub(d.checked) < hostsRecheck {
		return d.host, d.ok
	}
	dir, err := config.HostDirFromRoot(h.Dir)(registry)
	if err != nil && !errdefs.IsNotFound(err) {
		return Host{Err: fmt.Errorf("registry host configuration of %s: %w", registry, err)}, true
	}
	stamp := ""
	if dir != "" {
		stamp = dir
		if fi, err := os.Stat(filepath.Join(dir, "hosts.toml")); err == nil {
			stamp = fmt.Sprintf("%s %d %d", dir, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	if d != nil && d.stamp == stamp {
		h.mu.Lock()
		d.checked = now
		h.mu.Unlock()
		return d.host, d.ok
	}
	nd := &dirHosts{checked: now, stamp: stamp}
	if dir != "" {
		nd.host, nd.ok = h.configure(registry, dir, plain), true
	}
	h.mu.Lock()
	if h.dirs == nil {
		h.dirs = map[string]*dirHosts{}
	}
	h.dirs[registry] = nd
	h.mu.Unlock()
	return nd.host, nd.ok
}

// configure reads registry's hosts directory with containerd's parser.
func (h *Hosts) configure(registry, dir string, plain bool) Host {
	if !plain && h.Config != nil {
		plain = h.Config(registry).PlainHTTP
	}
	opts := config.HostOptions{
		HostDir:      func(string) (string, error) { return dir, nil },
		UpdateClient: tuneClient,
	}
	if plain {
		// The registry's own server, when hosts.toml does not name it.
		opts.DefaultScheme = "http"
	}
	rhosts, err := config.ConfigureHosts(context.Background(), opts)(registry)
	if err != nil {
		return Host{Err: fmt.Errorf("registry host configuration of %s (%s): %w", registry, dir, err)}
	}
	host := Host{Endpoints: []Endpoint{}}
	own := apiHost(registry)
	for _, rh := range rhosts {
		ep := Endpoint{
			Scheme: rh.Scheme, Host: rh.Host, Path: rh.Path, Header: rh.Header,
			Mirror: rh.Host != own,
		}
		if rh.Capabilities&docker.HostCapabilityPull != 0 {
			ep.Capabilities |= CapPull
		}
		if rh.Capabilities&docker.HostCapabilityResolve != 0 {
			ep.Capabilities |= CapResolve
		}
		if rh.Capabilities&docker.HostCapabilityPush != 0 {
			ep.Capabilities |= CapPush
		}
		if plain && !ep.Mirror {
			ep.Scheme = "http"
		}
		// containerd gives every host a client; only one with TLS
		// settings of its own (or containerd's HTTP fallback) needs it.
		if tr, ok := rh.Client.Transport.(*http.Transport); !ok || !defaultTLS(tr) {
			ep.Client = rh.Client
		}
		if !ep.Mirror && ep.Scheme == "http" {
			host.PlainHTTP = true
		}
		host.Endpoints = append(host.Endpoints, ep)
	}
	return host
}

// defaultTLS reports whether tr has no TLS settings of its own.
func defaultTLS(tr *http.Transport) bool {
	c := tr.TLSClientConfig
	return c == nil || (c.RootCAs == nil && len(c.Certificates) == 0 && !c.InsecureSkipVerify)
}

// tuneClient gives the HTTP clients containerd's parser makes the
// connection limits of the client's own transport (see New).
func tuneClient(c *http.Client) error {
	if tr, ok := c.Transport.(*http.Transport); ok {
		tr.MaxIdleConnsPerHost = 32
		tr.MaxConnsPerHost = 32
	}
	return nil
}

// Endpoints returns the endpoints of registry able to do what need says,
// in the order they are tried.
func (h *Hosts) Endpoints(registry string, need Capabilities) ([]Endpoint, error) {
	return h.endpoints(registry, need)
}

// endpoints is Endpoints.
func (h *Hosts) endpoints(registry string, need Capabilities) ([]Endpoint, error) {
	host := h.Lookup(registry)
	if host.Err != nil {
		return nil, host.Err
	}
	if host.Endpoints == nil {
		scheme := "https"
		if host.PlainHTTP {
			scheme = "http"
		}
		return []Endpoint{{Scheme: scheme, Host: apiHost(registry), Path: "/v2", Capabilities: CapAll}}, nil
	}
	var eps []Endpoint
	for _, ep := range host.Endpoints {
		if ep.Capabilities&need == need {
			eps = append(eps, ep)
		}
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("no host of %s may be asked to %s (the capabilities of its hosts.toml in %s)", registry, need, h.Dir)
	}
	return eps, nil
}

func (c Capabilities) String() string {
	switch c {
	case CapPull:
		return "pull"
	case CapResolve:
		return "resolve"
	case CapPush:
		return "push"
	}
	return fmt.Sprintf("capabilities(%d)", uint8(c))
}

// AllowPlainHTTP records that registry is reached over plain HTTP from now
// on (a user's --plain-http, or a record of one restored after a restart).
func (h *Hosts) AllowPlainHTTP(registry string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.plain == nil {
		h.plain = map[string]bool{}
	}
	if !h.plain[registry] {
		h.plain[registry] = true
		delete(h.dirs, registry) // read again with the scheme
	}
}
