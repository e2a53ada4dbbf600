package remote

import "sync"

// A Host is how the client reaches one registry. Today that is the
// scheme; the TLS settings and mirrors of a registry host configuration
// (containerd's hosts.toml) belong here too.
type Host struct {
	// PlainHTTP: the registry is reached over HTTP, not HTTPS.
	PlainHTTP bool
}

// Hosts resolves registries (host[:port] as in references) to how they are
// reached: the one place a client asks. A node has one, shared by every
// pull and every lazy read, so a registry a user reached with --plain-http
// is reached the same way by the frames its layers fetch later. The zero
// value (and nil) reaches every registry over HTTPS. It is safe for
// concurrent use.
type Hosts struct {
	// Config, if set, is the configured answer for a registry (for
	// instance containerd's hosts directory, or IsLoopback for test
	// registries), asked for the registries AllowPlainHTTP has not
	// marked.
	Config func(registry string) Host

	mu    sync.RWMutex
	plain map[string]bool
}

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
	// What AllowPlainHTTP recorded is the whole answer while a Host holds
	// only the scheme; Config (which may read files) is not asked.
	h.mu.RLock()
	plain := h.plain[registry]
	h.mu.RUnlock()
	if plain {
		return Host{PlainHTTP: true}
	}
	if h.Config != nil {
		return h.Config(registry)
	}
	return Host{}
}

// AllowPlainHTTP records that registry is reached over plain HTTP from now
// on (a user's --plain-http, or a record of one restored after a restart).
func (h *Hosts) AllowPlainHTTP(registry string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.plain == nil {
		h.plain = map[string]bool{}
	}
	h.plain[registry] = true
}
