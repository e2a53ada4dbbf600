package registry

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
	"golang.org/x/time/rate"
)

// Users is a set of accounts read from an htpasswd file (bcrypt entries,
// as `htpasswd -B` writes them).
type Users map[string][]byte

// LoadHtpasswd reads an htpasswd file. Only bcrypt hashes are accepted.
func LoadHtpasswd(path string) (Users, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("htpasswd: %w", err)
	}
	defer f.Close()
	users := Users{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, hash, ok := strings.Cut(line, ":")
		if !ok || user == "" || !strings.HasPrefix(hash, "$2") {
			return nil, fmt.Errorf("htpasswd %s line %d: want user:bcrypt-hash (htpasswd -B)", path, n)
		}
		users[user] = []byte(hash)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(users) == 0 {
		return nil, fmt.Errorf("htpasswd %s: no users", path)
	}
	return users, nil
}

func (u Users) valid(user, pass string) bool {
	hash, ok := u[user]
	if !ok {
		// Spend the same time as for a known user.
		bcrypt.CompareHashAndPassword(dummyHash(), []byte(pass))
		return false
	}
	return bcrypt.CompareHashAndPassword(hash, []byte(pass)) == nil
}

var dummyHash = sync.OnceValue(func() []byte {
	h, _ := bcrypt.GenerateFromPassword([]byte("strata"), bcrypt.DefaultCost)
	return h
})

// Bounds of the cost of authentication (see checker).
const (
	authCacheSize = 1024
	authCacheTTL  = 10 * time.Minute
	// A client may fail authentication authFailBurst times at once, then
	// once per authFailEvery; beyond that it is answered 429 at no cost.
	authFailBurst = 10
	authFailEvery = time.Second
	authClients   = 4096 // clients whose failures are remembered
)

// checker verifies basic credentials against users at a bounded cost: a
// bcrypt comparison costs about 100 ms of CPU, so credentials verified once
// are remembered (by a hash of user and password, for authCacheTTL), and a
// client that keeps failing is answered 429 without a comparison.
type checker struct {
	users Users
	mu    sync.Mutex
	ok    map[[32]byte]time.Time
	fails map[string]*rate.Limiter
	// compares counts bcrypt comparisons (tests).
	compares int
}

func newChecker(users Users) *checker {
	return &checker{users: users, ok: map[[32]byte]time.Time{}, fails: map[string]*rate.Limiter{}}
}

// check reports whether the credentials are valid; limited means the
// client failed too often and nothing was checked.
func (c *checker) check(client, user, pass string) (valid, limited bool) {
	key := sha256.Sum256([]byte(user + "\x00" + pass))
	now := time.Now()
	c.mu.Lock()
	if at, ok := c.ok[key]; ok && now.Sub(at) < authCacheTTL {
		c.mu.Unlock()
		return true, false
	}
	lim := c.fails[client]
	if lim != nil && lim.Tokens() < 1 {
		c.mu.Unlock()
		return false, true
	}
	c.compares++
	c.mu.Unlock()
	valid = c.users.valid(user, pass)
	c.mu.Lock()
	defer c.mu.Unlock()
	if valid {
		if len(c.ok) >= authCacheSize {
			clear(c.ok)
		}
		c.ok[key] = now
		return true, false
	}
	if lim == nil {
		if len(c.fails) >= authClients {
			clear(c.fails)
		}
		lim = rate.NewLimiter(rate.Every(authFailEvery), authFailBurst)
		c.fails[client] = lim
	}
	lim.Allow() // spend a token for this failure
	return false, false
}

// bearer returns the token of r's "Authorization: Bearer" header (the
// scheme's name in any case, as RFC 9110 has it).
func bearer(r *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// clientOf is the address a request comes from, without its port.
func clientOf(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// AuthConfig says who may do what on a registry (Authorize).
type AuthConfig struct {
	// Users are the accounts of basic authentication (htpasswd).
	Users Users
	// Access, with Users, restricts each account to its grants (an access
	// file); nil: every account may do everything.
	Access Access
	// AnonymousPull lets clients without credentials pull (with Users).
	AnonymousPull bool
	// Token, instead of Users, checks bearer tokens of a token server.
	Token *TokenAuth
}

// RequireAuth wraps h so that every /v2/ request needs valid basic
// credentials, except reads when anonymousPull is set (Authorize with
// users only).
func RequireAuth(h http.Handler, users Users, anonymousPull bool) http.Handler {
	return Authorize(h, AuthConfig{Users: users, AnonymousPull: anonymousPull})
}

// Authorize wraps h so that every /v2/ request is checked against what it
// needs (needOf: the actions on its repository): basic credentials against
// the accounts and their grants, or bearer tokens against what they grant.
// A client that did not authenticate is challenged (401); an account
// without the grant is denied (403); a token without the scope is
// challenged again for it (401, insufficient_scope), as distribution does.
// The base route /v2/ always challenges clients that did not
// authenticate: they learn from it how to. /metrics is not wrapped.
// Failures cost the server little (see checker).
func Authorize(h http.Handler, cfg AuthConfig) http.Handler {
	return authorize(h, cfg, newChecker(cfg.Users))
}

func authorize(h http.Handler, cfg AuthConfig, c *checker) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := needOf(r)
		rt, _ := parseRoute(r.URL.Path)
		base := rt.kind == "base"
		var grants Grants
		identified := false
		if cfg.Token != nil {
			if raw, ok := bearer(r); ok {
				gs, err := cfg.Token.verify(raw)
				if err != nil {
					w.Header().Set("WWW-Authenticate", cfg.Token.challenge(n.challengeScope(), "invalid_token"))
					writeError(w, r, newErr(http.StatusUnauthorized, codeUnauthorized, "invalid token: "+err.Error()))
					return
				}
				grants, identified = gs, true
			}
		} else if user, pass, ok := r.BasicAuth(); ok {
			valid, limited := c.check(clientOf(r), user, pass)
			switch {
			case valid:
				grants, identified = allGrants, true
				if cfg.Access != nil {
					grants = cfg.Access[user]
					if cfg.AnonymousPull {
						// An account may do at least what anyone may.
						grants = slices.Concat(grants, pullGrants)
					}
				}
			case limited && cfg.AnonymousPull && !base && pullGrants.allows(n):
				// A client whose stale credentials failed too often
				// still reads as anyone may: nothing was compared.
				grants = pullGrants
			case limited:
				w.Header().Set("Retry-After", "1")
				writeError(w, r, newErr(http.StatusTooManyRequests, codeTooManyRequests, "too many failed authentications from this client"))
				return
			case cfg.AnonymousPull && !base:
				// Credentials that do not check are no worse than none
				// (a client sending stale ones pulls as anyone may).
				grants = pullGrants
			}
		} else if cfg.AnonymousPull && !base {
			grants = pullGrants
		}
		challenge := func(errCode, msg string) {
			if cfg.Token != nil {
				w.Header().Set("WWW-Authenticate", cfg.Token.challenge(n.challengeScope(), errCode))
			} else {
				w.Header().Set("WWW-Authenticate", `Basic realm="strata"`)
			}
			writeError(w, r, newErr(http.StatusUnauthorized, codeUnauthorized, msg))
		}
		switch {
		case !identified && (base || grants == nil):
			challenge("", "authentication required")
			return
		case grants.allows(n):
		case !identified:
			challenge("", "authentication required")
			return
		case cfg.Token != nil:
			challenge("insufficient_scope", "the token does not grant "+n.scope())
			return
		default:
			writeError(w, r, newErr(http.StatusForbidden, codeDenied, "access to "+n.scope()+" denied"))
			return
		}
		h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), grantsKey{}, grants)))
	})
}
