package main

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// A config file (--config FILE, TOML) sets the flags of strata's services
// from a section each: its keys are the names of the flags of the command
// that owns the section, its values what the flag takes (a string for a
// string, size or duration flag, true or false for a boolean flag, an
// integer for an integer one, an array for a list). Nothing else is read:
// a section or key that names nothing, or a value of the wrong type, is an
// error naming the file, the section and the key. A flag given on the
// command line wins over the file.
//
// The node's other commands (run, pull, …) read [node] too: they take the
// keys they have a flag for (--root, --cache-size, …) and pass --config on
// to the daemon they start, which takes the rest (--idle-timeout, …).
// docs/config.md has an example of each section.

// configSections are the sections of a config file, each with the command
// (its path below strata) whose flags are its keys.
var configSections = map[string][]string{
	"node":        {"daemon"},
	"snapshotter": {"snapshotter"},
	"registry":    {"registry", "serve"},
}

// configFlag is the flag naming a command's config file.
const configFlag = "config"

// addConfigFlag gives cmd the --config flag, stored in *file.
func addConfigFlag(cmd *cobra.Command, file *string) {
	cmd.Flags().StringVar(file, configFlag, "", "read flags from this TOML file (see docs/config.md); flags given on the command line win")
}

// configSection is the section cmd reads, and the command owning it: its
// own, or for the node's other commands the daemon's. ok is false for a
// command that reads none.
func configSection(cmd *cobra.Command) (section string, owner []string, ok bool) {
	path := strings.Fields(cmd.CommandPath())[1:]
	for s, o := range configSections {
		if slices.Equal(path, o) {
			return s, o, true
		}
	}
	if cmd.GroupID == "node" {
		return "node", configSections["node"], true
	}
	if slices.Equal(path, []string{"registry", "gc"}) {
		return "registry", configSections["registry"], true // its root
	}
	return "", nil, false
}

// loadConfig sets cmd's flags from its config file, if it was given one.
// A command reading the section of another (the CLI reading the daemon's)
// takes the keys it has a flag for, after the section is checked as its
// owner would read it, so that a mistake is reported here rather than by a
// daemon starting in the background.
func loadConfig(cmd *cobra.Command) error {
	f := cmd.Flags().Lookup(configFlag)
	if f == nil || f.Value.String() == "" {
		return nil
	}
	file := f.Value.String()
	section, owner, ok := configSection(cmd)
	if !ok {
		return nil
	}
	keys, err := readConfig(file, section)
	if err != nil {
		return err
	}
	if keys == nil {
		return fmt.Errorf("%s: no [%s] section, which strata %s reads", file, section, strings.Join(owner, " "))
	}
	own := slices.Equal(strings.Fields(cmd.CommandPath())[1:], owner)
	if !own {
		// A command tree of its own, so that nothing of cmd's is set.
		o, _, err := newRootCmd().Find(owner)
		if err != nil {
			return err
		}
		if err := setFlags(o, file, section, keys, false); err != nil {
			return err
		}
	}
	return setFlags(cmd, file, section, keys, !own)
}

// readConfig reads file and returns the keys of its section (nil when it
// has no such section), after checking that it names no other sections
// than strata's.
func readConfig(file, section string) (map[string]any, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	var doc map[string]any
	if err := toml.Unmarshal(b, &doc); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			line, col := de.Position()
			return nil, fmt.Errorf("%s:%d:%d: %w", file, line, col, err)
		}
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var names []string
	for s := range configSections {
		names = append(names, "["+s+"]")
	}
	slices.Sort(names)
	for _, k := range slices.Sorted(maps.Keys(doc)) {
		_, isTable := doc[k].(map[string]any)
		switch _, known := configSections[k]; {
		case known && isTable:
		case known:
			return nil, fmt.Errorf("%s: %s is a section (%s), not a key", file, k, strings.Join(names, ", "))
		case isTable:
			return nil, fmt.Errorf("%s: unknown section [%s]%s (sections: %s)", file, k, suggest(k, slices.Collect(maps.Keys(configSections))), strings.Join(names, ", "))
		default:
			return nil, fmt.Errorf("%s: key %s is outside a section (sections: %s)", file, k, strings.Join(names, ", "))
		}
	}
	keys, _ := doc[section].(map[string]any)
	return keys, nil
}

// setFlags sets the flags of cmd named by keys, except those given on the
// command line. A key naming no flag of cmd is an error, or skipped with
// skipUnknown.
func setFlags(cmd *cobra.Command, file, section string, keys map[string]any, skipUnknown bool) error {
	fs := cmd.Flags()
	cmd.InheritedFlags() // merges the persistent flags (--log-level) into fs
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		where := fmt.Sprintf("%s: [%s] %s", file, section, k)
		if k == configFlag {
			return fmt.Errorf("%s: a config file cannot name another", where)
		}
		f := fs.Lookup(k)
		if k == "help" {
			f = nil
		}
		if f == nil {
			if skipUnknown {
				continue
			}
			return fmt.Errorf("%s: %s has no flag --%s%s", where, cmd.CommandPath(), k, suggest(k, flagNames(fs)))
		}
		if f.Changed {
			continue
		}
		args, err := flagArgs(f, keys[k])
		if err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			if err := sv.Replace(args); err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
			f.Changed = true
			continue
		}
		if err := fs.Set(k, args[0]); err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
	}
	return nil
}

// flagArgs turns a TOML value into the arguments of f: one, or one per
// element for a list flag. Its type must be the one f takes.
func flagArgs(f *pflag.Flag, v any) ([]string, error) {
	t := f.Value.Type()
	switch {
	case strings.HasSuffix(t, "Slice") || strings.HasSuffix(t, "Array"):
		elem := strings.TrimSuffix(strings.TrimSuffix(t, "Slice"), "Array")
		arr, ok := v.([]any)
		if !ok {
			return nil, wrongType(f, "an array of "+plural(elem), v)
		}
		args := []string{}
		for _, e := range arr {
			s, ok := scalar(elem, e)
			if !ok {
				return nil, wrongType(f, "an array of "+plural(elem), v)
			}
			args = append(args, s)
		}
		return args, nil
	case strings.HasPrefix(t, "stringTo"):
		elem := strings.ToLower(strings.TrimPrefix(t, "stringTo"))
		m, ok := v.(map[string]any)
		if !ok {
			return nil, wrongType(f, "a table of "+plural(elem), v)
		}
		var pairs []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			s, ok := scalar(elem, m[k])
			if !ok {
				return nil, wrongType(f, "a table of "+plural(elem), v)
			}
			pairs = append(pairs, k+"="+s)
		}
		return []string{strings.Join(pairs, ",")}, nil
	}
	s, ok := scalar(t, v)
	if !ok {
		return nil, wrongType(f, article(kind(t)), v)
	}
	return []string{s}, nil
}

// kind is the TOML type that values of the pflag type t take.
func kind(t string) string {
	switch {
	case t == "bool":
		return "boolean"
	case t == "count", strings.HasPrefix(t, "int"), strings.HasPrefix(t, "uint"):
		return "integer"
	case strings.HasPrefix(t, "float"):
		return "number"
	}
	return "string" // string, duration, and types of their own
}

// scalar formats v as an argument of a flag of pflag type t.
func scalar(t string, v any) (string, bool) {
	switch kind(t) {
	case "boolean":
		b, ok := v.(bool)
		return strconv.FormatBool(b), ok
	case "integer":
		i, ok := v.(int64)
		return strconv.FormatInt(i, 10), ok
	case "number":
		switch n := v.(type) {
		case int64:
			return strconv.FormatInt(n, 10), true
		case float64:
			return strconv.FormatFloat(n, 'g', -1, 64), true
		}
		return "", false
	}
	s, ok := v.(string)
	return s, ok
}

func wrongType(f *pflag.Flag, want string, v any) error {
	example := ""
	if d := f.DefValue; d != "" && d != "[]" && d != "<nil>" && kind(f.Value.Type()) == "string" {
		example = fmt.Sprintf(` (like %q)`, d)
	}
	return fmt.Errorf("--%s takes %s%s, not %s", f.Name, want, example, tomlType(v))
}

// tomlType names the TOML type of a decoded value.
func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case []any:
		return "an array"
	case map[string]any:
		return "a table"
	case time.Time, toml.LocalDate, toml.LocalTime, toml.LocalDateTime:
		return "a date or time"
	}
	return fmt.Sprintf("%T", v)
}

func plural(elem string) string {
	if elem == "" {
		return "values"
	}
	return kind(elem) + "s"
}

func article(s string) string {
	if strings.IndexByte("aeiou", s[0]) >= 0 {
		return "an " + s
	}
	return "a " + s
}

func flagNames(fs *pflag.FlagSet) []string {
	var names []string
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Name != configFlag && f.Name != "help" {
			names = append(names, f.Name)
		}
	})
	return names
}

// suggest is " (did you mean NAME?)" for the name closest to key, if one
// is close: spelled with underscores, or a letter or two away.
func suggest(key string, names []string) string {
	best, bestD := "", 3
	for _, n := range names {
		d := distance(strings.ReplaceAll(key, "_", "-"), n)
		if d < bestD {
			best, bestD = n, d
		}
	}
	if best == "" {
		return ""
	}
	return " (did you mean " + best + "?)"
}

// distance is the Levenshtein distance of a and b.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// configPath is file as the daemon started by a CLI command reads it,
// whatever its working directory.
func configPath(file string) string {
	if abs, err := filepath.Abs(file); err == nil {
		return abs
	}
	return file
}
