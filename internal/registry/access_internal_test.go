package registry

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestGrantPatterns: what each form of pattern matches.
func TestGrantPatterns(t *testing.T) {
	for _, tc := range []struct {
		pattern string
		yes, no []string
	}{
		{"team/app", []string{"team/app"}, []string{"team/app2", "team/app/x", "team"}},
		{"team/*", []string{"team/app", "team/b"}, []string{"team", "team/a/b", "other/app"}},
		{"team/**", []string{"team/app", "team/a/b/c"}, []string{"team", "teams/app", "other/team/app"}},
		{"*/ci/**", []string{"a/ci/x", "b/ci/x/y"}, []string{"a/ci", "ci/x", "a/b/ci/x"}},
		{"**", []string{"a", "a/b/c"}, []string{""}},
		{"app-?", []string{"app-1"}, []string{"app-12"}},
		{`team/\*`, []string{"team/*"}, []string{"team/app"}},
	} {
		g := Grant{Pattern: tc.pattern}
		for _, r := range tc.yes {
			if !g.matches(r) {
				t.Errorf("%q does not match %q", tc.pattern, r)
			}
		}
		for _, r := range tc.no {
			if g.matches(r) {
				t.Errorf("%q matches %q", tc.pattern, r)
			}
		}
	}
}

// TestLoadAccess: an access file's grants, and the mistakes it is refused
// for (naming the file, the account and the key).
func TestLoadAccess(t *testing.T) {
	load := func(text string) (Access, error) {
		file := filepath.Join(t.TempDir(), "access.toml")
		if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return LoadAccess(file)
	}
	acc, err := load(`
[alice]
"team/**" = ["pull", "push", "delete"]
"library/*" = ["pull"]
catalog = true

[ci]
"team/app" = ["*"]
catalog = ["pull"]   # the repository named catalog

[nobody]
`)
	if err != nil {
		t.Fatal(err)
	}
	want := Access{
		"alice":  {{Catalog: true}, {Pattern: "library/*", Actions: []string{"pull"}}, {Pattern: "team/**", Actions: []string{"pull", "push", "delete"}}},
		"ci":     {{Pattern: "catalog", Actions: []string{"pull"}}, {Pattern: "team/app", Actions: []string{"*"}}},
		"nobody": nil,
	}
	if d := cmp.Diff(want, acc); d != "" {
		t.Errorf("grants (-want +got):\n%s", d)
	}
	for _, tc := range []struct{ text, want string }{
		{"[a]\n\"x\" = [\"read\"]\n", `[a] "x": unknown action read`},
		{"[a]\n\"x\" = \"pull\"\n", `[a] "x": want a list of actions`},
		{"[a]\n\"x[\" = [\"pull\"]\n", `[a] "x[": syntax error in pattern`},
		{"[a]\n\"a/**/b\" = [\"pull\"]\n", `[a] "a/**/b": "**" stands only`},
		{"[a]\n\"a**\" = [\"pull\"]\n", `[a] "a**": "**" stands only`},
		{"[a]\n\"\" = [\"pull\"]\n", `[a] "": empty pattern`},
		{"[a]\ncatalog = 1\n", `[a] "catalog": want a list of actions (pull, push, delete, *), or catalog = true or false`},
		{"a = 1\n", "access file"},
		{"[a\n", "access file"},
	} {
		_, err := load(tc.text)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want an error with %q", tc.text, err, tc.want)
		}
	}
}
