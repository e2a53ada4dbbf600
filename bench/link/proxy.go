package link

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Proxy is a TCP proxy on a loopback port of the host that forwards every
// connection to an upstream address, adding latency: each chunk of bytes
// is held for half the round-trip time in each direction, measured from
// when it arrived (so a full pipe keeps its throughput: the proxy is a
// delay line, not a stop-and-wait), and the first bytes from the client
// wait one extra round trip, the TCP handshake a real link would cost.
// It counts the bytes of each direction.
type Proxy struct {
	ln       net.Listener
	upstream string
	dial     func(ctx context.Context, addr string) (net.Conn, error)
	rtt      atomic.Int64 // nanoseconds
	// rate, if set (bits per second), is the bandwidth of the link the
	// proxy emulates, shared by its connections, in each direction.
	rate atomic.Int64
	// busy is when each direction's emulated link is free again.
	busyMu             sync.Mutex
	busyUp, busyClient time.Time

	toUpstream, toClient atomic.Int64
	conns                atomic.Int64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	open   map[net.Conn]struct{}
}

// NewProxy listens on 127.0.0.1 (a free port) and forwards to upstream,
// dialled from inside the network namespace at nsPath ("" for the
// harness's own).
func NewProxy(upstream, nsPath string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return newProxy(ln, upstream, nsPath), nil
}

func newProxy(ln net.Listener, upstream, nsPath string) *Proxy {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{ln: ln, upstream: upstream, ctx: ctx, cancel: cancel, open: map[net.Conn]struct{}{}}
	p.dial = func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	if nsPath != "" {
		p.dial = func(ctx context.Context, addr string) (net.Conn, error) { return DialIn(ctx, nsPath, addr) }
	}
	p.wg.Add(1)
	go p.serve()
	return p
}

// Addr is the proxy's HOST:PORT on loopback.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// SetRTT sets the round-trip time added from now on.
func (p *Proxy) SetRTT(d time.Duration) { p.rtt.Store(int64(d)) }

// SetRate makes the proxy emulate a link of bits per second of its own in
// each direction, shared by all its connections (0: none), for a link
// that tc cannot shape: one between two processes of one namespace.
func (p *Proxy) SetRate(bits int64) { p.rate.Store(bits) }

// transmit returns when n bytes sent at the earliest at from have crossed
// the emulated link of the direction busy is the clock of.
func (p *Proxy) transmit(busy *time.Time, from time.Time, n int) time.Time {
	rate := p.rate.Load()
	if rate <= 0 {
		return from
	}
	p.busyMu.Lock()
	defer p.busyMu.Unlock()
	start := from
	if busy.After(start) {
		start = *busy
	}
	*busy = start.Add(time.Duration(float64(n) * 8 / float64(rate) * float64(time.Second)))
	return *busy
}

// NewProxyIn is NewProxy listening on 127.0.0.1 inside the network
// namespace at listenNS instead of the harness's: for a process there (a
// mirror in the registries' namespace) to reach upstream through it.
func NewProxyIn(listenNS, upstream, nsPath string) (*Proxy, error) {
	ln, err := listenIn(listenNS)
	if err != nil {
		return nil, err
	}
	return newProxy(ln, upstream, nsPath), nil
}

// listenIn listens on a free port of 127.0.0.1 inside the namespace at
// nsPath (the listening socket stays there).
func listenIn(nsPath string) (net.Listener, error) {
	return inNetNS(nsPath, func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") })
}

// Bytes returns the bytes forwarded to the upstream and to the clients so
// far, and the number of connections accepted.
func (p *Proxy) Bytes() (toUpstream, toClient, conns int64) {
	return p.toUpstream.Load(), p.toClient.Load(), p.conns.Load()
}

// Close stops listening and cuts every open connection.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.cancel()
	p.mu.Lock()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.conns.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.handle(c, time.Now())
		}()
	}
}

func (p *Proxy) track(c net.Conn, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		p.open[c] = struct{}{}
	} else {
		delete(p.open, c)
	}
}

func (p *Proxy) handle(client net.Conn, accepted time.Time) {
	ctx, cancel := context.WithTimeout(p.ctx, 30*time.Second)
	up, err := p.dial(ctx, p.upstream)
	cancel()
	if err != nil {
		client.Close()
		return
	}
	p.track(client, true)
	p.track(up, true)
	defer func() {
		client.Close()
		up.Close()
		p.track(client, false)
		p.track(up, false)
	}()
	rtt := time.Duration(p.rtt.Load())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(up, client, rtt/2, accepted.Add(rtt), &p.toUpstream, &p.busyUp) }()
	go func() { defer wg.Done(); p.pipe(client, up, rtt/2, time.Time{}, &p.toClient, &p.busyClient) }()
	wg.Wait()
}

type chunk struct {
	b  []byte
	at time.Time
}

// pipe copies src to dst, delivering each chunk delay after it arrived
// (and not before notBefore + delay), then half-closes dst.
func (p *Proxy) pipe(dst, src net.Conn, delay time.Duration, notBefore time.Time, count *atomic.Int64, busy *time.Time) {
	q := make(chan chunk, 4096)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			n, err := src.Read(buf)
			if n > 0 {
				at := time.Now()
				if at.Before(notBefore) {
					at = notBefore
				}
				// With a rate, a chunk arrives once its last byte crossed.
				q <- chunk{buf[:n], p.transmit(busy, at, n)}
			}
			if err != nil {
				return
			}
		}
	}()
	failed := false
	for c := range q {
		if failed {
			continue // drain so the reader can finish
		}
		if d := time.Until(c.at.Add(delay)); d > 0 {
			time.Sleep(d)
		}
		n, err := dst.Write(c.b)
		count.Add(int64(n))
		if err != nil {
			failed = true
			src.Close()
		}
	}
	if tc, ok := dst.(interface{ CloseWrite() error }); ok && !failed {
		tc.CloseWrite()
	} else {
		dst.Close()
	}
}

// DialIn dials addr with a socket made inside the network namespace at
// nsPath: the dialling goroutine's thread enters the namespace for the
// socket(2) call and leaves it again; the socket stays in the namespace.
func DialIn(ctx context.Context, nsPath, addr string) (net.Conn, error) {
	return inNetNS(nsPath, func() (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	})
}

// inNetNS runs f on a thread inside the network namespace at nsPath, then
// takes the thread back out; sockets f makes stay in the namespace. A
// thread that cannot leave is not unlocked: the runtime ends it with its
// goroutine.
func inNetNS[T io.Closer](nsPath string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		var zero T
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- result{zero, err}
			return
		}
		defer orig.Close()
		target, err := os.Open(nsPath)
		if err != nil {
			ch <- result{zero, err}
			runtime.UnlockOSThread()
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{zero, fmt.Errorf("enter %s: %w", nsPath, err)}
			runtime.UnlockOSThread()
			return
		}
		v, err := f()
		if err2 := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err2 != nil {
			if err == nil {
				v.Close()
			}
			ch <- result{zero, errors.Join(err, fmt.Errorf("leave %s: %w", nsPath, err2))}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}

var _ io.Closer = (*Proxy)(nil)
