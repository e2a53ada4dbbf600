package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/strata-oci/strata/internal/testenv"
)

// parseOnly runs the command line args through strata's command tree as
// main does, with the command's own work replaced by nothing, and returns
// the command, the exit status and stderr.
func parseOnly(t *testing.T, args ...string) (*cobra.Command, int, string) {
	t.Helper()
	root := newRootCmd()
	cmd, _, err := root.Find(args)
	if err != nil {
		t.Fatal(err)
	}
	cmd.RunE = func(*cobra.Command, []string) error { return nil }
	var stderr strings.Builder
	code := execute(context.Background(), root, args, &stderr)
	return cmd, code, stderr.String()
}

// flagValues are the values of cmd's flags named in want, for a diff.
func flagValues(cmd *cobra.Command, want map[string]string) map[string]string {
	got := map[string]string{}
	for name := range want {
		if f := cmd.Flags().Lookup(name); f != nil {
			got[name] = f.Value.String()
		}
	}
	return got
}

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), "strata.toml")
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// TestConfig: each service takes its flags from its section of a config
// file; a flag on the command line wins; the node's other commands take
// the keys they share with the daemon.
func TestConfig(t *testing.T) {
	const file = `
[node]
root = "/srv/node"
cache-size = "3GiB"
idle-timeout = "0s"
log-level = "debug"

[snapshotter]
address = "/run/x/snap.sock"
cache-size = "5GiB"

[registry]
addr = "0.0.0.0:5555"
root = "/srv/registry"
expand-workers = 8
anonymous-pull = true
upstream-ttl = "1h"
`
	for _, tc := range []struct {
		args []string // FILE stands for the config file
		want map[string]string
	}{
		{[]string{"daemon", "--config", "FILE"}, map[string]string{
			"root": "/srv/node", "cache-size": "3GiB", "idle-timeout": "0s", "log-level": "debug", "fetch-timeout": "30s", "layer-linger": "1m0s"}},
		{[]string{"daemon", "--config", "FILE", "--cache-size", "1GiB", "--log-level=warn"}, map[string]string{
			"root": "/srv/node", "cache-size": "1GiB", "idle-timeout": "0s", "log-level": "warn"}},
		// How the CLI starts the daemon: node flags before the command.
		{[]string{"--root", "/r", "--config", "FILE", "daemon"}, map[string]string{"root": "/r", "cache-size": "3GiB"}},
		{[]string{"snapshotter", "--config", "FILE"}, map[string]string{
			"address": "/run/x/snap.sock", "cache-size": "5GiB", "root": "/var/lib/strata", "hosts-dir": "/etc/containerd/certs.d", "log-level": "info"}},
		{[]string{"registry", "serve", "--config", "FILE", "--expand-workers", "1"}, map[string]string{
			"addr": "0.0.0.0:5555", "root": "/srv/registry", "expand-workers": "1", "anonymous-pull": "true", "upstream-ttl": "1h0m0s", "htpasswd": ""}},
		// The CLI takes [node]'s keys it has a flag for.
		{[]string{"pull", "--config", "FILE", "REF"}, map[string]string{"root": "/srv/node", "cache-size": "3GiB", "log-level": "debug", "plain-http": "false"}},
		{[]string{"--config", "FILE", "--root", "/r", "rmi", "REF"}, map[string]string{"root": "/r", "cache-size": "3GiB"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			args := replace(tc.args, "FILE", writeConfig(t, file))
			cmd, code, stderr := parseOnly(t, args...)
			if code != 0 {
				t.Fatalf("exit status %d: %s", code, stderr)
			}
			if diff := cmp.Diff(tc.want, flagValues(cmd, tc.want)); diff != "" {
				t.Errorf("flags (-want +got):\n%s", diff)
			}
		})
	}
}

func replace(args []string, old, new string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = strings.ReplaceAll(a, old, new)
	}
	return out
}

// TestConfigErrors: what names no flag, or does not fit the flag it names,
// is an error naming the file, the section and the key; nothing runs.
func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string // FILE stands for the config file
		file string
		want string // after "strata COMMAND: FILE"
	}{
		{"typo", []string{"daemon", "--config", "FILE"}, "[node]\ncache-sise = \"1GiB\"\n",
			": [node] cache-sise: strata daemon has no flag --cache-sise (did you mean cache-size?)"},
		{"underscore", []string{"registry", "serve", "--config", "FILE"}, "[registry]\nexpand_workers = 2\n",
			": [registry] expand_workers: strata registry serve has no flag --expand_workers (did you mean expand-workers?)"},
		{"another command's flag", []string{"snapshotter", "--config", "FILE"}, "[snapshotter]\nidle-timeout = \"0s\"\n",
			": [snapshotter] idle-timeout: strata snapshotter has no flag --idle-timeout"},
		{"integer for a string", []string{"daemon", "--config", "FILE"}, "[node]\ncache-size = 1024\n",
			`: [node] cache-size: --cache-size takes a string (like "2GiB"), not an integer`},
		{"integer for a duration", []string{"daemon", "--config", "FILE"}, "[node]\nidle-timeout = 0\n",
			`: [node] idle-timeout: --idle-timeout takes a string (like "30s"), not an integer`},
		{"string for an integer", []string{"registry", "serve", "--config", "FILE"}, "[registry]\nexpand-workers = \"4\"\n",
			": [registry] expand-workers: --expand-workers takes an integer, not a string"},
		{"string for a boolean", []string{"registry", "serve", "--config", "FILE"}, "[registry]\nanonymous-pull = \"yes\"\n",
			": [registry] anonymous-pull: --anonymous-pull takes a boolean, not a string"},
		{"invalid duration", []string{"daemon", "--config", "FILE"}, "[node]\nfetch-timeout = \"30\"\n",
			`: [node] fetch-timeout: invalid argument "30" for "--fetch-timeout" flag: time: missing unit in duration "30"`},
		{"unknown section", []string{"daemon", "--config", "FILE"}, "[nodes]\nroot = \"/x\"\n",
			": unknown section [nodes] (did you mean node?) (sections: [node], [registry], [snapshotter])"},
		{"key outside a section", []string{"daemon", "--config", "FILE"}, "root = \"/x\"\n",
			": key root is outside a section (sections: [node], [registry], [snapshotter])"},
		{"no section", []string{"daemon", "--config", "FILE"}, "[registry]\nroot = \"/x\"\n",
			": no [node] section, which strata daemon reads"},
		{"config in config", []string{"daemon", "--config", "FILE"}, "[node]\nconfig = \"/x.toml\"\n",
			": [node] config: a config file cannot name another"},
		{"not TOML", []string{"daemon", "--config", "FILE"}, "[node]\nroot = /x\n",
			":2:8: toml: "},
		{"CLI: not a daemon flag", []string{"run", "--config", "FILE", "IMAGE", "true"}, "[node]\nrm = true\n",
			": [node] rm: strata daemon has no flag --rm"},
		{"CLI: a daemon key of the wrong type", []string{"images", "--config", "FILE"}, "[node]\nlayer-linger = 60\n",
			`: [node] layer-linger: --layer-linger takes a string (like "1m0s"), not an integer`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := writeConfig(t, tc.file)
			args := replace(tc.args, "FILE", file)
			root := newRootCmd()
			cmd, _, err := root.Find(args)
			if err != nil {
				t.Fatal(err)
			}
			want := 2
			if isRun(cmd) {
				want = 125
			}
			ran := false
			cmd.RunE = func(*cobra.Command, []string) error { ran = true; return nil }
			var stderr strings.Builder
			if code := execute(context.Background(), root, args, &stderr); code != want {
				t.Errorf("exit status %d, want %d", code, want)
			}
			if ran {
				t.Error("the command ran")
			}
			prefix := cmd.CommandPath() + ": " + file + tc.want
			if got := stderr.String(); !strings.HasPrefix(got, prefix) || strings.Count(got, "\n") != 1 {
				t.Errorf("stderr %q, want one line starting %q", got, prefix)
			}
		})
	}
}

// TestConfigDaemonStart: a CLI command given a config file starts the
// daemon with it (as an absolute path) and with the values it took from
// it and from its command line, so the daemon reads the same file and
// takes its own keys from it.
func TestConfigDaemonStart(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "node.toml"), []byte("[node]\nroot = \"/srv/node\"\ncache-size = \"3GiB\"\nidle-timeout = \"5m\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	cmd, code, stderr := parseOnly(t, "pull", "--config", "node.toml", "--cache-size", "1GiB", "REF")
	if code != 0 {
		t.Fatalf("exit status %d: %s", code, stderr)
	}
	get := func(name string) string { return cmd.Flags().Lookup(name).Value.String() }
	g := &globalFlags{root: get("root"), cacheSize: get("cache-size"), logLevel: get("log-level"), profiles: get("startup-profiles"), config: get("config")}
	g.fetchTimeout, _ = time.ParseDuration(get("fetch-timeout"))
	start := g.daemonArgs()
	if !strings.Contains(strings.Join(start, " "), " --config "+filepath.Join(dir, "node.toml")+" ") {
		t.Errorf("daemon start %q does not pass the config file as an absolute path", start)
	}
	t.Chdir(t.TempDir())
	daemon, code, stderr := parseOnly(t, start[1:]...)
	if code != 0 || daemon.Name() != "daemon" {
		t.Fatalf("daemon start %q: %s, exit status %d: %s", start, daemon.Name(), code, stderr)
	}
	want := map[string]string{"root": "/srv/node", "cache-size": "1GiB", "idle-timeout": "5m0s"}
	if diff := cmp.Diff(want, flagValues(daemon, want)); diff != "" {
		t.Errorf("daemon's flags (-want +got):\n%s", diff)
	}
}

// TestFlagArgs: the TOML values each type of flag takes, for flags added
// later: lists as arrays, maps as tables.
func TestFlagArgs(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	fs.StringSlice("strings", nil, "")
	fs.IntSlice("ints", nil, "")
	fs.StringToString("labels", nil, "")
	fs.Float64("ratio", 0, "")
	fs.Uint16("port", 0, "")
	fs.CountP("verbose", "v", "")
	fs.IP("ip", nil, "")
	for _, tc := range []struct {
		flag  string
		value any
		want  []string
		err   string
	}{
		{flag: "strings", value: []any{"a", "b,c"}, want: []string{"a", "b,c"}},
		{flag: "strings", value: []any{}, want: []string{}},
		{flag: "strings", value: "a", err: "--strings takes an array of strings, not a string"},
		{flag: "strings", value: []any{"a", int64(1)}, err: "--strings takes an array of strings, not an array"},
		{flag: "ints", value: []any{int64(1), int64(-2)}, want: []string{"1", "-2"}},
		{flag: "labels", value: map[string]any{"b": "2", "a": "1"}, want: []string{"a=1,b=2"}},
		{flag: "labels", value: map[string]any{"a": true}, err: "--labels takes a table of strings, not a table"},
		{flag: "ratio", value: 0.5, want: []string{"0.5"}},
		{flag: "ratio", value: int64(2), want: []string{"2"}},
		{flag: "port", value: int64(80), want: []string{"80"}},
		{flag: "port", value: 80.5, err: "--port takes an integer, not a float"},
		{flag: "verbose", value: int64(2), want: []string{"2"}},
		{flag: "ip", value: "10.0.0.1", want: []string{"10.0.0.1"}},
		{flag: "ip", value: time.Now(), err: "--ip takes a string, not a date or time"},
	} {
		got, err := flagArgs(fs.Lookup(tc.flag), tc.value)
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("%s = %v: error %v, want %q", tc.flag, tc.value, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s = %v: %v", tc.flag, tc.value, err)
		} else if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s = %v (-want +got):\n%s", tc.flag, tc.value, diff)
		}
	}
	// A list replaces the default.
	fs.Set("strings", "default")
	f := fs.Lookup("strings")
	f.Changed = false
	cmd := &cobra.Command{Use: "t"}
	cmd.Flags().AddFlagSet(fs)
	if err := setFlags(cmd, "f.toml", "s", map[string]any{"strings": []any{"x", "y"}}, false); err != nil {
		t.Fatal(err)
	}
	if got := f.Value.String(); got != "[x,y]" || !f.Changed {
		t.Errorf("--strings = %s (changed %v), want [x,y]", got, f.Changed)
	}
}

// ownerArgs is the command line of the command owning section, reading
// file.
func ownerArgs(section, file string) []string {
	return append(append([]string{}, configSections[section]...), "--config", file)
}

// TestContribConfigs: the example configs of contrib/config and the
// examples of docs/config.md are read without error by the commands whose
// sections they hold, every key setting a flag.
func TestContribConfigs(t *testing.T) {
	files, err := filepath.Glob("../../contrib/config/*.toml")
	if err != nil || len(files) != len(configSections) {
		t.Fatalf("contrib/config: %v %v, want one file per section", files, err)
	}
	for _, file := range files {
		section := strings.TrimSuffix(filepath.Base(file), ".toml")
		checkExample(t, file, section)
	}
	doc, err := os.ReadFile("../../docs/config.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```toml\n(.*?)```").FindAllStringSubmatch(string(doc), -1)
	seen := map[string]bool{}
	for _, b := range blocks {
		m := regexp.MustCompile(`(?m)^\[(\w+)\]$`).FindStringSubmatch(b[1])
		if m == nil || configSections[m[1]] == nil {
			continue // containerd's configuration, say
		}
		seen[m[1]] = true
		file := filepath.Join(t.TempDir(), "example.toml")
		os.WriteFile(file, []byte(b[1]), 0o644)
		t.Run("docs/config.md#"+m[1], func(t *testing.T) { checkExample(t, file, m[1]) })
	}
	for s := range configSections {
		if !seen[s] {
			t.Errorf("docs/config.md has no example of [%s]", s)
		}
	}
}

// checkExample loads file through the owner of section and checks that
// each of its keys set a flag.
func checkExample(t *testing.T, file, section string) {
	t.Helper()
	keys, err := readConfig(file, section)
	if err != nil || len(keys) == 0 {
		t.Fatalf("%s: %v, %d keys in [%s]", file, err, len(keys), section)
	}
	cmd, code, stderr := parseOnly(t, ownerArgs(section, file)...)
	if code != 0 {
		t.Fatalf("%s: exit status %d: %s", file, code, stderr)
	}
	for k := range keys {
		if f := cmd.Flags().Lookup(k); f == nil || !f.Changed {
			t.Errorf("%s: [%s] %s set no flag", file, section, k)
		}
	}
}

// TestContribUnits: the systemd units of contrib/systemd pass
// systemd-analyze verify, and each starts a command that reads its
// example config.
func TestContribUnits(t *testing.T) {
	units, err := filepath.Glob("../../contrib/systemd/*.service")
	if err != nil || len(units) != 4 {
		t.Fatalf("contrib/systemd: %v %v", units, err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, unit := range units {
		b, err := os.ReadFile(unit)
		if err != nil {
			t.Fatal(err)
		}
		// The command line starts strata with --config /etc/strata/X.toml,
		// where contrib/config/X.toml goes.
		m := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/strata (.*)$`).FindStringSubmatch(string(b))
		if m == nil {
			t.Errorf("%s: no ExecStart=/usr/local/bin/strata …", unit)
			continue
		}
		args := strings.Fields(m[1])
		file := ""
		for i, a := range args {
			if a == "--config" && i+1 < len(args) {
				file = args[i+1]
				args[i+1] = filepath.Join("../../contrib/config", strings.TrimPrefix(file, "/etc/strata/"))
			}
		}
		if !strings.HasPrefix(file, "/etc/strata/") {
			t.Errorf("%s: ExecStart takes no --config /etc/strata/…", unit)
		} else if _, code, stderr := parseOnly(t, args...); code != 0 {
			t.Errorf("%s: strata %s: exit status %d: %s", unit, strings.Join(args, " "), code, stderr)
		}
		// systemd-analyze verify wants the program to exist.
		b = []byte(strings.ReplaceAll(string(b), "/usr/local/bin/strata", exe))
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(unit)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	testenv.RequireTool(t, "systemd-analyze")
	paths, _ := filepath.Glob(filepath.Join(dir, "*.service"))
	out, err := exec.Command("systemd-analyze", append([]string{"verify", "--man=no"}, paths...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// It warns of what it ignores (an unknown key, say) and succeeds.
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if strings.Contains(line, dir) || strings.Contains(line, "strata-") {
			t.Errorf("systemd-analyze verify: %s", line)
		} else if line != "" {
			t.Logf("systemd-analyze verify: %s", line)
		}
	}
}

// TestRegistryAuthFlags: the registry's authentication flags (and their
// config keys) that do not go together are refused before it serves,
// rather than one of them silently ignored.
func TestRegistryAuthFlags(t *testing.T) {
	dir := t.TempDir()
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:$2y$05$abcdefghijklmnopqrstuuJ1pGq3hC5o8fN9b0rWm0H7p1cz0e6a\n"), 0o600)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"token with htpasswd", []string{"--auth", "token", "--htpasswd", htpasswd}, "--auth token takes no --htpasswd"},
		{"token with anonymous pull", []string{"--auth", "token", "--anonymous-pull"}, "--auth token takes no"},
		{"token without its flags", []string{"--auth", "token", "--token-realm", "https://auth.example/token"}, "needs --token-realm, --token-issuer, --token-service and --token-cert"},
		{"token flags without token", []string{"--htpasswd", htpasswd, "--token-cert", "x.pem"}, "need --auth token"},
		{"access without htpasswd", []string{"--access", "access.toml"}, "--access and --anonymous-pull need it"},
		{"anonymous pull without htpasswd", []string{"--anonymous-pull"}, "need it"},
		{"none with htpasswd", []string{"--auth", "none", "--htpasswd", htpasswd}, "--auth none takes no --htpasswd"},
		{"htpasswd mode without the file", []string{"--auth", "htpasswd"}, "needs --htpasswd FILE"},
		{"unknown mode", []string{"--auth", "ldap"}, `--auth "ldap"`},
		{"config file", []string{"--config", writeConfig(t, "[registry]\nauth = \"token\"\ntoken-realm = \"https://auth.example/token\"\n")}, "needs --token-realm, --token-issuer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"registry", "serve", "--root", t.TempDir(), "--addr", "127.0.0.1:0"}, tc.args...)
			var stderr strings.Builder
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // should it serve, it stops at once
			code := execute(ctx, newRootCmd(), args, &stderr)
			if code == 0 || !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("exit status %d, stderr %q; want an error naming %q", code, stderr.String(), tc.want)
			}
		})
	}
}
