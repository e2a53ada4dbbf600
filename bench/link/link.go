// Package link emulates the network between a node and a registry for the
// benchmarks: two network namespaces made for the run and joined by a veth
// pair, bandwidth shaped with tc (tbf) on both ends, and latency added by a
// TCP proxy on the node side that delays every byte by half the round trip
// in each direction and counts what crosses.
//
//	host (node: strata, containerd)          netns <name>-a        netns <name>-b
//	client ──▶ 127.0.0.1:P  proxy ── dial from inside ─▶ veth a ══ tbf ══ veth b ──▶ registry
//
// The /30 addresses of the veth pair exist only inside the two namespaces;
// the host sees nothing but the proxy's loopback port. Close removes the
// namespaces (and with them the veth pair and the qdiscs).
package link

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Profile is one emulated link.
type Profile struct {
	Name string `json:"name"`
	// RateBits is the bandwidth in bits per second each way; 0: unshaped.
	RateBits int64 `json:"rate_bits"`
	// RTTMillis is the round-trip time the proxy adds.
	RTTMillis float64 `json:"rtt_ms"`
}

// String describes p for tables.
func (p Profile) String() string {
	if p.RateBits == 0 && p.RTTMillis == 0 {
		return p.Name + " (unshaped)"
	}
	return fmt.Sprintf("%s (%s, %g ms RTT)", p.Name, Rate(p.RateBits), p.RTTMillis)
}

// Rate formats a bit rate.
func Rate(bits int64) string {
	switch {
	case bits == 0:
		return "unshaped"
	case bits%1_000_000_000 == 0:
		return fmt.Sprintf("%d Gbit/s", bits/1_000_000_000)
	default:
		return fmt.Sprintf("%g Mbit/s", float64(bits)/1e6)
	}
}

// Profiles are the links of the benchmark issue, plus an unshaped one.
var Profiles = []Profile{
	{Name: "loopback"},
	{Name: "datacenter", RateBits: 1_000_000_000, RTTMillis: 2},
	{Name: "regional", RateBits: 100_000_000, RTTMillis: 20},
	{Name: "edge", RateBits: 20_000_000, RTTMillis: 80},
}

// Lookup returns the profile named name.
func Lookup(name string) (Profile, bool) {
	for _, p := range Profiles {
		if p.Name == name {
			return p, true
		}
	}
	return Profile{}, false
}

// Prefix starts the name of every namespace this package makes; the
// creating process's pid follows, so stale ones can be recognised.
const Prefix = "strata-bench-"

// Net is a pair of namespaces joined by a veth pair.
type Net struct {
	Name string // namespaces Name-a (node side) and Name-b (registry side)
	// RegistryIP is the address of the registry side, reachable only from
	// inside Name-a (see Dial).
	RegistryIP string
	nodeIP     string
	vethA      string
	vethB      string
}

// NodeNS and RegistryNS are the paths of the namespaces, for nsenter --net.
func (n *Net) NodeNS() string     { return "/run/netns/" + n.Name + "-a" }
func (n *Net) RegistryNS() string { return "/run/netns/" + n.Name + "-b" }

// New makes the namespaces and the veth pair, unshaped. index (0–63)
// picks the /30 so that concurrent harnesses do not collide inside their
// namespaces (it would not matter: the namespaces are separate).
func New(ctx context.Context, index int) (_ *Net, err error) {
	pid := os.Getpid()
	n := &Net{
		Name:       fmt.Sprintf("%s%d-%d", Prefix, pid, index),
		nodeIP:     fmt.Sprintf("10.213.%d.%d", pid%250, 4*(index%64)+1),
		RegistryIP: fmt.Sprintf("10.213.%d.%d", pid%250, 4*(index%64)+2),
		vethA:      fmt.Sprintf("sb%da%d", pid%100000, index),
		vethB:      fmt.Sprintf("sb%db%d", pid%100000, index),
	}
	defer func() {
		if err != nil {
			n.Close(context.WithoutCancel(ctx))
		}
	}()
	a, b := n.Name+"-a", n.Name+"-b"
	steps := [][]string{
		{"ip", "netns", "add", a},
		{"ip", "netns", "add", b},
		{"ip", "link", "add", n.vethA, "type", "veth", "peer", "name", n.vethB},
		{"ip", "link", "set", n.vethA, "netns", a},
		{"ip", "link", "set", n.vethB, "netns", b},
		{"ip", "-n", a, "addr", "add", n.nodeIP + "/30", "dev", n.vethA},
		{"ip", "-n", b, "addr", "add", n.RegistryIP + "/30", "dev", n.vethB},
		{"ip", "-n", a, "link", "set", "lo", "up"},
		{"ip", "-n", b, "link", "set", "lo", "up"},
		{"ip", "-n", a, "link", "set", n.vethA, "up"},
		{"ip", "-n", b, "link", "set", n.vethB, "up"},
	}
	for _, s := range steps {
		if err := sh(ctx, s...); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// Shape sets the bandwidth of both directions (tbf on each veth end); a
// rate of 0 removes the shaping.
func (n *Net) Shape(ctx context.Context, rateBits int64) error {
	for _, end := range []struct{ ns, dev string }{{n.Name + "-a", n.vethA}, {n.Name + "-b", n.vethB}} {
		// Ignore the error: there may be no root qdisc to delete.
		sh(ctx, "ip", "netns", "exec", end.ns, "tc", "qdisc", "del", "dev", end.dev, "root")
		if rateBits == 0 {
			continue
		}
		// The bucket holds 2 ms of traffic (at least 64 KiB, so that a
		// GSO packet passes whole); the queue holds 50 ms.
		burst := max(rateBits/8/500, 64<<10)
		if err := sh(ctx, "ip", "netns", "exec", end.ns, "tc", "qdisc", "add", "dev", end.dev, "root",
			"tbf", "rate", strconv.FormatInt(rateBits, 10)+"bit", "burst", strconv.FormatInt(burst, 10), "latency", "50ms"); err != nil {
			return err
		}
	}
	return nil
}

// Counters returns the bytes the node side of the link received and sent
// (the veth's counters, headers included).
func (n *Net) Counters(ctx context.Context) (rx, tx int64, err error) {
	read := func(name string) (int64, error) {
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", n.Name+"-a", "cat", "/sys/class/net/"+n.vethA+"/statistics/"+name).Output()
		if err != nil {
			return 0, fmt.Errorf("read %s counter: %w", name, err)
		}
		return strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	}
	if rx, err = read("rx_bytes"); err != nil {
		return 0, 0, err
	}
	tx, err = read("tx_bytes")
	return rx, tx, err
}

// Close removes the namespaces; the veth pair and its qdiscs go with them.
// Processes still inside a namespace keep it alive: stop them first.
func (n *Net) Close(ctx context.Context) error {
	var errs []error
	for _, ns := range []string{n.Name + "-a", n.Name + "-b"} {
		if _, err := os.Stat("/run/netns/" + ns); err == nil {
			errs = append(errs, sh(ctx, "ip", "netns", "del", ns))
		}
	}
	return errors.Join(errs...)
}

// CleanStale removes namespaces left by harness processes that no longer
// exist (a harness killed with SIGKILL cannot clean up after itself).
func CleanStale(ctx context.Context) {
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), Prefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			sh(ctx, "ip", "netns", "del", filepath.Base(e.Name()))
		}
	}
}

func sh(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
