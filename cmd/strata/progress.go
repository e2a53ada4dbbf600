package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/strata-oci/strata/internal/nodeapi"
	"golang.org/x/sys/unix"
)

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// withProgress runs fn and, when stderr is a terminal, draws a progress bar
// of the daemon's fallback downloads meanwhile.
func withProgress(ctx context.Context, c *nodeapi.Client, fn func() error) error {
	if !isTerminal(os.Stderr) {
		return fn()
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		drawn := false
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				if drawn {
					fmt.Fprint(os.Stderr, "\r\033[K")
				}
				return
			case <-t.C:
			}
			ds, err := c.Downloads(ctx)
			if err != nil || len(ds) == 0 {
				continue
			}
			var got, total int64
			for _, d := range ds {
				got, total = got+d.Done, total+d.Total
			}
			fmt.Fprintf(os.Stderr, "\r\033[Kdownloading %d layer(s) %s %s / %s", len(ds), bar(got, total, 30), human(got), human(total))
			drawn = true
		}
	}()
	err := fn()
	close(done)
	<-finished
	return err
}

func bar(n, total int64, width int) string {
	if total <= 0 {
		return "[" + strings.Repeat(" ", width) + "]"
	}
	k := int(int64(width) * min(n, total) / total)
	return "[" + strings.Repeat("=", k) + strings.Repeat(" ", width-k) + "]"
}
