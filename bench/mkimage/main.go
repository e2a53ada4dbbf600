// Command mkimage builds the images of strata's demo and benchmarks as OCI
// image layouts: a Debian (bookworm, minbase) root filesystem with the given
// packages, made with debootstrap from the mirror apt uses, as one gzip
// layer, or split into several layers with -layers.
//
//	go run ./bench/mkimage -o DIR [-tag latest] [-layers N] [-cmd python3] python3
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testimage"
)

func main() {
	out := flag.String("o", "", "OCI layout directory to write (required)")
	tag := flag.String("tag", "latest", "tag in the layout")
	suite := flag.String("suite", "bookworm", "Debian suite")
	cmd := flag.String("cmd", "", "image command (space separated)")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "mkimage: -o is required")
		os.Exit(2)
	}
	if err := run(context.Background(), *out, *tag, *suite, *cmd, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, out, tag, suite, cmd string, packages []string) error {
	fmt.Fprintf(os.Stderr, "mkimage: debootstrap %s + %s (cached in %s)\n", suite, strings.Join(packages, ","), testimage.DefaultCacheDir)
	rootfs, err := testimage.Debian(ctx, testimage.DefaultCacheDir, suite, packages...)
	if err != nil {
		return err
	}
	var tarBuf bytes.Buffer
	if err := testimage.Tar(ctx, rootfs, &tarBuf); err != nil {
		return err
	}
	layer := ocilayout.GzipLayer(tarBuf.Bytes())
	cfg := ocispec.ImageConfig{Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}}
	if cmd != "" {
		cfg.Cmd = strings.Fields(cmd)
	} else {
		cfg.Cmd = []string{"/bin/bash"}
	}
	d, err := ocilayout.Write(out, tag, ocilayout.Image{Layers: []ocilayout.Layer{layer}, Config: cfg})
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "mkimage: %s:%s = %s (layer %d bytes gzip, %d bytes tar)\n", out, tag, d, len(layer.Blob), tarBuf.Len())
	return nil
}
