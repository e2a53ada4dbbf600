package layerindex_test

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"log"

	"github.com/strata-oci/strata/layerindex"
)

func Example() {
	// A layer blob: here a plain tar with one file.
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/motd", Mode: 0o644, Size: 6})
	tw.Write([]byte("hello\n"))
	tw.Close()

	// Registry side: expand it once into an index and a data blob.
	var data bytes.Buffer
	x, err := layerindex.Build(context.Background(), &layer, &data, layerindex.Options{})
	if err != nil {
		log.Fatal(err)
	}
	index, err := x.MarshalBinary()
	if err != nil {
		log.Fatal(err)
	}

	// Node side: decode the index, find the file, fetch and verify the
	// frames that hold it.
	y, err := layerindex.Decode(index)
	if err != nil {
		log.Fatal(err)
	}
	i, _ := y.Lookup("/etc/motd")
	e := y.Entries[i]
	first, last := y.FramesFor(e.Offset, e.Size)
	var stream []byte
	for k := first; k <= last; k++ {
		f := y.Frames[k]
		compressed := data.Bytes()[f.COffset : f.COffset+f.CSize] // a ranged GET of the data blob
		if stream, err = y.AppendFrame(stream, k, compressed); err != nil {
			log.Fatal(err)
		}
	}
	start := e.Offset - y.Frames[first].UOffset
	fmt.Printf("%s %o %q\n", e.Type, e.Mode, stream[start:start+e.Size])
	// Output: reg 644 "hello\n"
}
