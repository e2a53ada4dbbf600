package registry

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"

	"golang.org/x/crypto/bcrypt"
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

// RequireAuth wraps h so that every /v2/ request needs valid basic
// credentials, except reads (GET, HEAD, and the layer-mount POST, which is a
// read) when anonymousPull is set. /metrics is not wrapped.
func RequireAuth(h http.Handler, users Users, anonymousPull bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if anonymousPull && isRead(r) {
			h.ServeHTTP(w, r)
			return
		}
		if user, pass, ok := r.BasicAuth(); ok && users.valid(user, pass) {
			h.ServeHTTP(w, r)
			return
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="strata"`)
		writeError(w, r, newErr(http.StatusUnauthorized, codeUnauthorized, "authentication required"))
	})
}

// isRead tells reads from writes. The base route /v2/ always challenges:
// clients learn from it whether to send credentials at all.
func isRead(r *http.Request) bool {
	rt, ok := parseRoute(r.URL.Path)
	if ok && rt.kind == "base" {
		return false
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	return ok && r.Method == http.MethodPost && rt.kind == "ext" && strings.HasSuffix(rt.rest, "/mount")
}
