// Command strata-bench-stargz is the benchmark harness's peer system:
// stargz-snapshotter, the strongest open lazy-pull system, built from its
// library packages (its own commands are not published as a Go module).
// It lives in a module of its own so that strata's module does not depend
// on stargz-snapshotter.
//
//	strata-bench-stargz serve -address SOCK -root DIR
//	    serve stargz's snapshotter as a containerd proxy plugin
//	strata-bench-stargz convert [-prioritized FILE] SRC-LAYOUT DST-LAYOUT
//	    convert an OCI image layout to eStargz (plain, or with the listed
//	    files first and a prefetch landmark: what stargz's optimizer makes)
//	strata-bench-stargz rpull -address SOCK REF
//	    pull REF into containerd with the stargz snapshotter, layers left
//	    remote (what `ctr-remote image rpull` does)
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "serve":
		fs := flag.NewFlagSet(cmd, flag.ExitOnError)
		addr := fs.String("address", "", "unix socket to serve the snapshotter's gRPC API on")
		root := fs.String("root", "", "the snapshotter's root directory (snapshots, fetched data)")
		level := fs.String("log-level", "warn", "log level")
		fs.Parse(args)
		if *addr == "" || *root == "" || fs.NArg() != 0 {
			usage()
		}
		err = serve(ctx, *addr, *root, *level)
	case "convert":
		fs := flag.NewFlagSet(cmd, flag.ExitOnError)
		prio := fs.String("prioritized", "", "file listing the paths to put first, one a line (an optimized eStargz)")
		tag := fs.String("tag", "latest", "the image's tag in both layouts")
		fs.Parse(args)
		if fs.NArg() != 2 {
			usage()
		}
		err = convert(ctx, fs.Arg(0), fs.Arg(1), *tag, *prio)
	case "rpull":
		fs := flag.NewFlagSet(cmd, flag.ExitOnError)
		addr := fs.String("address", "", "containerd's socket")
		snapshotter := fs.String("snapshotter", "stargz", "the proxy snapshotter's name in containerd's config")
		fs.Parse(args)
		if *addr == "" || fs.NArg() != 1 {
			usage()
		}
		err = rpull(ctx, *addr, *snapshotter, fs.Arg(0))
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "strata-bench-stargz:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage:
  strata-bench-stargz serve -address SOCK -root DIR [-log-level LEVEL]
  strata-bench-stargz convert [-prioritized FILE] [-tag TAG] SRC-LAYOUT DST-LAYOUT
  strata-bench-stargz rpull -address SOCK [-snapshotter NAME] REF`)
	os.Exit(2)
}
