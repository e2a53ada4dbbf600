// Command strata runs the strata registry and node.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := execute(ctx, newRootCmd(), os.Args[1:], os.Stderr)
	stop()
	os.Exit(code)
}

// execute runs the command line args, reports an error on stderr in one
// line, and returns the process's exit status.
func execute(ctx context.Context, root *cobra.Command, args []string, stderr io.Writer) int {
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	var ee exitError
	switch {
	case err == nil, errors.As(err, &ee):
	case errors.As(err, new(usageError)):
		fmt.Fprintln(stderr, err) // it names the command
	default:
		fmt.Fprintln(stderr, "strata:", err)
	}
	return exitStatus(cmd, err)
}
