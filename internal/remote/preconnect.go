package remote

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// A connPool holds connections opened ahead of the requests that will use
// them (Client.Preconnect); the transport's dialer takes them first.
type connPool struct {
	dialer *net.Dialer
	mu     sync.Mutex
	conns  map[string][]net.Conn // by "host:port", oldest first
}

// preconnectMaxAge is how long an opened connection waits for a request
// before it is closed: less than a registry's idle timeout, so a request
// never gets a connection the server already dropped.
const preconnectMaxAge = 5 * time.Second

func (p *connPool) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if network == "tcp" {
		p.mu.Lock()
		if cs := p.conns[addr]; len(cs) > 0 {
			c := cs[len(cs)-1]
			p.conns[addr] = cs[:len(cs)-1]
			p.mu.Unlock()
			return c, nil
		}
		p.mu.Unlock()
	}
	return p.dialer.DialContext(ctx, network, addr)
}

func (p *connPool) add(addr string, c net.Conn) {
	p.mu.Lock()
	p.conns[addr] = append(p.conns[addr], c)
	p.mu.Unlock()
	time.AfterFunc(preconnectMaxAge, func() {
		p.mu.Lock()
		cs := p.conns[addr]
		for i, x := range cs {
			if x == c {
				p.conns[addr] = append(cs[:i:i], cs[i+1:]...)
				p.mu.Unlock()
				c.Close()
				return
			}
		}
		p.mu.Unlock()
	})
}

// Preconnect opens n connections to registry in the background, for the
// requests that follow to use instead of each waiting for a handshake of
// its own: as soon as a pull has the manifest it sends several requests at
// once (config, start-up profile, layer mounts, indexes), and over
// HTTP/1.1 each needs a connection. Connections no request took within a
// few seconds are closed. It does nothing when the client was given its
// own Transport or goes through an HTTP proxy.
func (c *Client) Preconnect(registry string, n int) {
	if c.pool == nil {
		return
	}
	eps, err := c.opts.Hosts.endpoints(registry, CapPull)
	if err != nil || eps[0].Client != nil { // a transport of its own
		return
	}
	req, err := http.NewRequest(http.MethodGet, request{registry: registry, path: "/v2/", endpoint: eps[0]}.url(), nil)
	if err != nil {
		return
	}
	if proxy, err := http.ProxyFromEnvironment(req); err != nil || proxy != nil {
		return
	}
	addr := req.URL.Host
	if req.URL.Port() == "" {
		port := "443"
		if req.URL.Scheme == "http" {
			port = "80"
		}
		addr = net.JoinHostPort(req.URL.Hostname(), port)
	}
	for range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), preconnectMaxAge)
			defer cancel()
			if conn, err := c.pool.dialer.DialContext(ctx, "tcp", addr); err == nil {
				c.pool.add(addr, conn)
			}
		}()
	}
}
