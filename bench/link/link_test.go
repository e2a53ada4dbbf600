package link_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-oci/strata/bench/link"
	"github.com/strata-oci/strata/internal/testenv"
)

// TestProxyLoopback forwards through the proxy without namespaces: every
// byte arrives, both directions are counted, half-closes pass through.
func TestProxyLoopback(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	p, err := link.NewProxy(ln.Addr().String(), "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	p.SetRTT(10 * time.Millisecond)
	start := time.Now()
	got := get(t, "http://"+p.Addr()+"/")
	if !bytes.Equal(got, body) {
		t.Fatalf("got %d bytes, want %d", len(got), len(body))
	}
	if el := time.Since(start); el < 20*time.Millisecond {
		t.Errorf("a new connection took %v through a proxy adding 10 ms RTT; want at least 2 RTT (handshake, request)", el)
	}
	up, down, conns := p.Bytes()
	if down < int64(len(body)) || up == 0 || conns != 1 {
		t.Errorf("counted %d bytes up, %d down, %d conns", up, down, conns)
	}
}

// TestShapedLink runs a server in the registry namespace of a real Net and
// fetches through a shaped, delayed link. It logs the throughput it saw;
// the benchmark, not this test, is where timings are judged.
func TestShapedLink(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "tc")
	ctx := context.Background()
	n, err := link.New(ctx, 63)
	if err != nil {
		testenv.Unavailable(t, "cannot make network namespaces: "+err.Error())
	}
	t.Cleanup(func() {
		if err := n.Close(context.Background()); err != nil {
			t.Error(err)
		}
		if _, err := os.Stat(n.NodeNS()); err == nil {
			t.Error("namespace left behind")
		}
	})
	if err := n.Shape(ctx, 100_000_000); err != nil {
		t.Fatal(err)
	}
	ln := listenIn(t, n.RegistryNS(), n.RegistryIP+":8080")
	body := make([]byte, 4<<20)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	p, err := link.NewProxy(n.RegistryIP+":8080", n.NodeNS())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	p.SetRTT(20 * time.Millisecond)
	rx0, _, err := n.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if got := get(t, "http://"+p.Addr()+"/"); len(got) != len(body) {
		t.Fatalf("got %d bytes", len(got))
	}
	el := time.Since(start)
	rx1, _, _ := n.Counters(ctx)
	if rx1-rx0 < int64(len(body)) {
		t.Errorf("veth counted %d bytes received, want at least %d", rx1-rx0, len(body))
	}
	t.Logf("4 MiB at 100 Mbit/s, 20 ms RTT: %v (ideal %v)", el, 40*time.Millisecond+time.Duration(float64(len(body))*8/100e6*float64(time.Second)))
}

func get(t *testing.T, url string) []byte {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true}
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// listenIn listens on addr inside the network namespace at ns.
func listenIn(t *testing.T, ns, addr string) net.Listener {
	t.Helper()
	type res struct {
		ln  net.Listener
		err error
	}
	ch := make(chan res)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		f, err := os.Open(ns)
		if err != nil {
			ch <- res{err: err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- res{err: err}
			return
		}
		ln, err := net.Listen("tcp", addr)
		ch <- res{ln, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.ln
}

// TestProxyRate: a proxy with a rate of its own delivers no faster than it,
// over all its connections together.
func TestProxyRate(t *testing.T) {
	body := make([]byte, 1<<20)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	p, err := link.NewProxy(ln.Addr().String(), "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	p.SetRate(40_000_000) // 5 MB/s: 2 MiB take ≥ 0.42 s
	start := time.Now()
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			if got := get(t, "http://"+p.Addr()+"/"); len(got) != len(body) {
				t.Errorf("got %d bytes", len(got))
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	t.Logf("2 MiB through a 40 Mbit/s proxy, on two connections: %v", el)
	if el < 400*time.Millisecond || el > 2*time.Second {
		t.Errorf("took %v, want about 0.42 s", el)
	}
}
