package main

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestUsageExitStatus: every command group of the tree rejects a command
// it does not have, and every command an unknown flag, with exit status 2
// (125 for run) and one line naming the command; nothing runs.
func TestUsageExitStatus(t *testing.T) {
	var paths [][]string
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		paths = append(paths, path)
		for _, sub := range c.Commands() {
			walk(sub, append(append([]string{}, path...), sub.Name()))
		}
	}
	walk(newRootCmd(), nil)
	for _, path := range paths {
		group := newRootCmd()
		c, _, err := group.Find(path)
		if err != nil {
			t.Fatal(err)
		}
		want := 2
		if isRun(c) {
			want = 125
		}
		var cases [][]string
		if c.HasSubCommands() {
			cases = append(cases, append(append([]string{}, path...), "no-such-command"))
		}
		cases = append(cases, append(append([]string{}, path...), "--no-such-flag"))
		for _, args := range cases {
			root := newRootCmd()
			root.SetOut(io.Discard)
			var stderr strings.Builder
			if code := execute(context.Background(), root, args, &stderr); code != want {
				t.Errorf("strata %s: exit status %d, want %d", strings.Join(args, " "), code, want)
			}
			msg := stderr.String()
			if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, strings.Join(append([]string{"strata"}, path...), " ")+": ") {
				t.Errorf("strata %s: stderr %q, want one line naming the command", strings.Join(args, " "), msg)
			}
		}
	}
}

// TestNodeFlags: the node's flags belong to the node's commands, not to
// the registry's.
func TestNodeFlags(t *testing.T) {
	root := newRootCmd()
	for _, c := range root.Commands() {
		for _, f := range []string{"root", "cache-size", "fetch-timeout", "startup-profiles"} {
			has := c.Flags().Lookup(f) != nil || c.InheritedFlags().Lookup(f) != nil
			if node := c.GroupID == "node"; has != node {
				t.Errorf("strata %s: has --%s %v, a node command %v", c.Name(), f, has, node)
			}
		}
	}
	serve, _, err := root.Find([]string{"registry", "serve"})
	if err != nil {
		t.Fatal(err)
	}
	if f := serve.Flags().Lookup("root"); f == nil || f.DefValue != "/var/lib/strata/registry" {
		t.Errorf("registry serve --root: %+v, want the registry's own", f)
	}
	if serve.InheritedFlags().Lookup("cache-size") != nil {
		t.Error("registry serve inherits --cache-size")
	}
}
