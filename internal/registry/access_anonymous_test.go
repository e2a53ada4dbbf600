package registry_test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"github.com/strata-oci/strata/internal/registry"
)

// TestAccessAnonymousPull: with an access file and --anonymous-pull,
// anyone pulls everything, and an account may do at least that plus its
// grants (an account the file does not name, or one granted less than
// pull somewhere, pulls there too); writes still need the grant. A client
// sending stale credentials keeps reading as anyone may, however many
// times they fail.
func TestAccessAnonymousPull(t *testing.T) {
	dir := t.TempDir()
	var ht strings.Builder
	for _, u := range []string{"alice", "carol"} {
		h, _ := bcrypt.GenerateFromPassword([]byte(u+"-pw"), bcrypt.MinCost)
		fmt.Fprintf(&ht, "%s:%s\n", u, h)
	}
	os.WriteFile(filepath.Join(dir, "htpasswd"), []byte(ht.String()), 0o600)
	os.WriteFile(filepath.Join(dir, "access.toml"), []byte("[alice]\n\"team/**\" = [\"push\"]\n"), 0o600)
	users, err := registry.LoadHtpasswd(filepath.Join(dir, "htpasswd"))
	if err != nil {
		t.Fatal(err)
	}
	access, err := registry.LoadAccess(filepath.Join(dir, "access.toml"))
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Users: users, Access: access, AnonymousPull: true})
	mb := []byte(do(t, "GET", f.open.URL+"/v2/team/app/manifests/v1", map[string]string{"Accept": mtManifest}, nil).body)
	req := func(user, pass, method, path string, body []byte) resp {
		h := map[string]string{"Accept": mtManifest, "Content-Type": mtManifest}
		if user != "" {
			r, _ := http.NewRequest("GET", "/", nil)
			r.SetBasicAuth(user, pass)
			h["Authorization"] = r.Header.Get("Authorization")
		}
		return do(t, method, f.guarded.URL+path, h, body)
	}
	for _, tc := range []struct {
		user, method, path string
		want               int
	}{
		{"", "GET", "/v2/team/app/manifests/v1", 200},
		{"", "GET", "/v2/other/app/manifests/v1", 200},
		{"", "GET", "/v2/_catalog", 200},
		{"", "GET", "/v2/", 401},
		{"", "PUT", "/v2/team/app/manifests/v2", 401},
		{"carol", "GET", "/v2/other/app/manifests/v1", 200},
		{"carol", "PUT", "/v2/team/app/manifests/v2", 403},
		{"alice", "GET", "/v2/team/app/manifests/v1", 200},
		{"alice", "GET", "/v2/other/app/manifests/v1", 200},
		{"alice", "PUT", "/v2/other/app/manifests/v2", 403},
		{"alice", "PUT", "/v2/team/app/manifests/v2", 201},
		{"alice", "DELETE", "/v2/team/app/manifests/v2", 403},
	} {
		var body []byte
		if tc.method == "PUT" {
			body = mb
		}
		if r := req(tc.user, tc.user+"-pw", tc.method, tc.path, body); r.code != tc.want {
			t.Errorf("%q %s %s: %d %s, want %d", tc.user, tc.method, tc.path, r.code, r.body, tc.want)
		}
	}
	codes := map[int]int{}
	for range 30 {
		codes[req("alice", "stale", "GET", "/v2/team/app/manifests/v1", nil).code]++
	}
	if codes[200] != 30 {
		t.Errorf("30 reads with stale credentials: %v, want all 200", codes)
	}
	if r := req("alice", "stale", "PUT", "/v2/team/app/manifests/v2", mb); r.code != 401 && r.code != 429 {
		t.Errorf("a push with stale credentials: %d", r.code)
	}
}
