package registry

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Actions on a repository, as the Docker token protocol names them.
const (
	ActionPull   = "pull"
	ActionPush   = "push"
	ActionDelete = "delete"
)

// A need is what a request needs: to be authenticated at all, and the
// actions on a repository (or on the catalog) it performs.
type need struct {
	repo    string   // "" for requests about no repository
	actions []string // on repo; nil: authentication only
	catalog bool     // registry:catalog:*
	// from is a cross-repository mount's source: pull on it is asked
	// for in challenges, as distribution does, but not required (without
	// it the mount is an ordinary upload).
	from string
}

// scope is the need as a token scope ("repository:NAME:pull,push").
func (n need) scope() string {
	switch {
	case n.catalog:
		return "registry:catalog:*"
	case n.repo != "" && len(n.actions) > 0:
		return "repository:" + n.repo + ":" + strings.Join(n.actions, ",")
	}
	return ""
}

// challengeScope is the scope a challenge names for n: its own, and pull
// on a mount's source, space-separated as the token protocol has it.
func (n need) challengeScope() string {
	s := n.scope()
	if n.from != "" && s != "" {
		s += " repository:" + n.from + ":" + ActionPull
	}
	return s
}

// needOf says what request r needs. Every route is covered: reads (GET,
// HEAD, and the layer-mount POST) need pull, writes push (uploads pull and
// push, as distribution asks), deletes delete; the strata extension's
// routes of a repository count as that repository's reads and writes.
// A cross-repository mount's need of its source is checked where it
// happens (startUpload).
func needOf(r *http.Request) need {
	rt, ok := parseRoute(r.URL.Path)
	if !ok {
		return need{}
	}
	read := r.Method == http.MethodGet || r.Method == http.MethodHead
	switch rt.kind {
	case "base":
		return need{}
	case "catalog":
		return need{catalog: true}
	case "tags", "referrers":
		return need{repo: rt.repo, actions: []string{ActionPull}}
	case "manifest", "blob":
		switch {
		case read:
			return need{repo: rt.repo, actions: []string{ActionPull}}
		case r.Method == http.MethodDelete:
			return need{repo: rt.repo, actions: []string{ActionDelete}}
		}
		return need{repo: rt.repo, actions: []string{ActionPush}}
	case "upload":
		n := need{repo: rt.repo, actions: []string{ActionPull, ActionPush}}
		if q := r.URL.Query(); rt.ref == "" && r.Method == http.MethodPost && q.Get("mount") != "" && validName(q.Get("from")) && q.Get("from") != rt.repo {
			n.from = q.Get("from")
		}
		return n
	case "ext":
		if rt.repo == "" {
			return need{} // registry-wide information (the info route)
		}
		if read || (r.Method == http.MethodPost && strings.HasSuffix(rt.rest, "/mount")) {
			return need{repo: rt.repo, actions: []string{ActionPull}}
		}
		return need{repo: rt.repo, actions: []string{ActionPush}}
	}
	return need{}
}

// Grants are the actions an identity may perform, by repository pattern.
type Grants []Grant

// A Grant gives Actions on the repositories Pattern matches: a name, a
// path.Match pattern ("team/*": one level), a pattern of the first
// components followed by "/**" ("team/**": every repository under team/,
// at any depth, not team itself; "*/ci/**"), or "**" (all). Actions may
// hold "*" for all three. Catalog gives the catalog.
type Grant struct {
	Pattern string
	Actions []string
	Catalog bool
}

func (g Grant) matches(repo string) bool {
	switch {
	case repo == "":
		return false // a route that lost its repository grants nothing
	case g.Pattern == "**":
		return true
	}
	if prefix, ok := strings.CutSuffix(g.Pattern, "/**"); ok {
		// The first components of repo match prefix, and more follow.
		n := strings.Count(prefix, "/") + 1
		parts := strings.SplitN(repo, "/", n+1)
		if len(parts) <= n {
			return false
		}
		ok, _ := path.Match(prefix, strings.Join(parts[:n], "/"))
		return ok
	}
	ok, _ := path.Match(g.Pattern, repo)
	return ok
}

// checkPattern reports what is wrong with a grant's pattern: path.Match
// syntax, and "**" anywhere but as the whole pattern or its last component
// (where path.Match would take it for "*").
func checkPattern(pattern string) error {
	if pattern == "" {
		return errors.New("empty pattern")
	}
	if _, err := path.Match(pattern, ""); err != nil {
		return err
	}
	if strings.Contains(strings.TrimSuffix(pattern, "**"), "**") || strings.HasSuffix(pattern, "**") && pattern != "**" && !strings.HasSuffix(pattern, "/**") {
		return errors.New(`"**" stands only for the whole pattern or its last component ("team/**")`)
	}
	return nil
}

// allows reports whether gs give every action of n.
func (gs Grants) allows(n need) bool {
	if n.catalog {
		return slices.ContainsFunc(gs, func(g Grant) bool { return g.Catalog })
	}
	for _, a := range n.actions {
		if !gs.allowsAction(n.repo, a) {
			return false
		}
	}
	return true
}

func (gs Grants) allowsAction(repo, action string) bool {
	for _, g := range gs {
		if g.matches(repo) && (slices.Contains(g.Actions, action) || slices.Contains(g.Actions, "*")) {
			return true
		}
	}
	return false
}

// allGrants are the grants of an account when no access file restricts
// them.
var allGrants = Grants{{Pattern: "**", Actions: []string{"*"}, Catalog: true}}

// pullGrants are anonymous clients' grants with --anonymous-pull.
var pullGrants = Grants{{Pattern: "**", Actions: []string{ActionPull}, Catalog: true}}

// Access maps accounts to their grants (an access file).
type Access map[string]Grants

// LoadAccess reads an access file: a TOML table per account, whose keys
// are repository patterns (see Grant) and values lists of actions, and an
// optional catalog = true:
//
//	[alice]
//	"team/**" = ["pull", "push", "delete"]
//	"library/*" = ["pull"]
//	catalog = true
//
//	[ci]
//	"team/app" = ["pull", "push"]
//
// An account the file does not name may do nothing, except pull when
// anonymous pulls are allowed (AuthConfig.AnonymousPull): an account may
// always do what anyone may.
func LoadAccess(file string) (Access, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("access file: %w", err)
	}
	var doc map[string]map[string]any
	if err := toml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("access file %s: %w", file, err)
	}
	acc := Access{}
	for account, table := range doc {
		var gs Grants
		keys := make([]string, 0, len(table))
		for k := range table {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, pattern := range keys {
			v := table[pattern]
			if on, ok := v.(bool); ok && pattern == "catalog" {
				if on {
					gs = append(gs, Grant{Catalog: true})
				}
				continue
			}
			// (A list under "catalog" is the repository of that name.)
			if err := checkPattern(pattern); err != nil {
				return nil, fmt.Errorf("access file %s: [%s] %q: %v", file, account, pattern, err)
			}
			list, ok := v.([]any)
			if !ok {
				return nil, fmt.Errorf("access file %s: [%s] %q: want a list of actions (pull, push, delete, *), or catalog = true or false", file, account, pattern)
			}
			g := Grant{Pattern: pattern}
			for _, a := range list {
				s, _ := a.(string)
				switch s {
				case ActionPull, ActionPush, ActionDelete, "*":
					g.Actions = append(g.Actions, s)
				default:
					return nil, fmt.Errorf("access file %s: [%s] %q: unknown action %v (pull, push, delete, *)", file, account, pattern, a)
				}
			}
			gs = append(gs, g)
		}
		acc[account] = gs
	}
	return acc, nil
}

// grantsKey carries a request's grants in its context (for the checks
// handlers make themselves: a cross-repository mount's source).
type grantsKey struct{}

// mayPull reports whether the request of ctx may pull from repo: true
// when the registry checks no access at all.
func mayPull(ctx context.Context, repo string) bool {
	gs, ok := ctx.Value(grantsKey{}).(Grants)
	return !ok || gs.allowsAction(repo, ActionPull)
}
