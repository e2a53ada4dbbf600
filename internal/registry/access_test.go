package registry_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/crypto/bcrypt"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/expand"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// authFixture is a store holding an image in team/app and in other/app,
// with its layer expanded, served by an open registry (to set things up)
// and by one with cfg's access control.
type authFixture struct {
	open, guarded *httptest.Server
	manifest      digest.Digest
	layer, config digest.Digest
}

func newAuthFixture(t *testing.T, cfg registry.ServeConfig) *authFixture {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ex, err := expand.New(st, expand.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ex.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	mk := func(cfg registry.ServeConfig) *httptest.Server {
		reg := registry.New(st, registry.Options{OnManifest: ex.OnManifest})
		reg.Extension(api.Extension, ex.Handler(func(r *http.Request) (string, string) { return registry.RepoFromContext(r.Context()) }))
		cfg.Store = st
		srv := httptest.NewServer(registry.Handler(reg, cfg))
		t.Cleanup(srv.Close)
		return srv
	}
	f := &authFixture{open: mk(registry.ServeConfig{}), guarded: mk(cfg)}
	tr, err := ocilayout.Tar([]ocilayout.Entry{{Name: "f", Content: []byte("hello")}})
	if err != nil {
		t.Fatal(err)
	}
	l := ocilayout.GzipLayer(tr)
	cfgJSON, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{l.DiffID}}})
	for _, repo := range []string{"team/app", "other/app"} {
		f.layer = pushBlob(t, f.open.URL, repo, l.Blob)
		f.config = pushBlob(t, f.open.URL, repo, cfgJSON)
		m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
			Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: f.config, Size: int64(len(cfgJSON))},
			Layers: []ocispec.Descriptor{{MediaType: l.MediaType, Digest: f.layer, Size: int64(len(l.Blob))}}}
		m.SchemaVersion = 2
		mb, _ := json.Marshal(m)
		if r := do(t, "PUT", f.open.URL+"/v2/"+repo+"/manifests/v1", map[string]string{"Content-Type": mtManifest}, mb); r.code != 201 {
			t.Fatalf("push %s: %d %s", repo, r.code, r.body)
		}
		f.manifest = digest.FromBytes(mb)
	}
	return f
}

// route is one request of the matrix: what it needs of repository
// team/app (or other/app, or nothing).
type route struct {
	name, method, path string
	body               []byte
	hdr                map[string]string
}

func (f *authFixture) routes(t *testing.T, repo string) []route {
	mb := do(t, "GET", f.open.URL+"/v2/team/app/manifests/v1", map[string]string{"Accept": mtManifest}, nil).body
	return []route{
		{"manifest GET", "GET", "/v2/" + repo + "/manifests/v1", nil, map[string]string{"Accept": mtManifest}},
		{"manifest HEAD", "HEAD", "/v2/" + repo + "/manifests/v1", nil, nil},
		{"blob GET", "GET", "/v2/" + repo + "/blobs/" + f.layer.String(), nil, nil},
		{"tags", "GET", "/v2/" + repo + "/tags/list", nil, nil},
		{"referrers", "GET", "/v2/" + repo + "/referrers/" + f.manifest.String(), nil, nil},
		{"layer mount", "POST", api.MountPath(repo, f.layer), nil, nil},
		{"profile GET", "GET", api.ProfilePath(repo, f.manifest), nil, nil},
		{"manifest PUT", "PUT", "/v2/" + repo + "/manifests/v2", []byte(mb), map[string]string{"Content-Type": mtManifest}},
		{"upload POST", "POST", "/v2/" + repo + "/blobs/uploads/", nil, nil},
		{"profile PUT", "PUT", api.ProfilePath(repo, f.manifest), []byte(`{"version":0,"layers":[]}`), map[string]string{"Content-Type": "application/json"}},
		{"blob DELETE", "DELETE", "/v2/" + repo + "/blobs/sha256:" + strings.Repeat("0", 64), nil, nil},
	}
}

// reads is how many of routes() are reads (pull); then writes (push);
// then the delete.
const reads, writes = 7, 3

// allowedCode reports whether code says the request passed access control
// (whatever the handler then answered).
func allowedCode(code int) bool {
	return code != http.StatusUnauthorized && code != http.StatusForbidden
}

// TestAccessMatrix: with htpasswd and an access file, every route of the
// distribution API and of strata's extension is allowed or refused by the
// account's grants on its repository: accounts × repositories × routes.
// Before, any account could do anything anywhere.
func TestAccessMatrix(t *testing.T) {
	dir := t.TempDir()
	var ht strings.Builder
	for _, u := range []string{"alice", "bob", "carol"} {
		h, _ := bcrypt.GenerateFromPassword([]byte(u+"-pw"), bcrypt.MinCost)
		fmt.Fprintf(&ht, "%s:%s\n", u, h)
	}
	os.WriteFile(filepath.Join(dir, "htpasswd"), []byte(ht.String()), 0o600)
	os.WriteFile(filepath.Join(dir, "access.toml"), []byte(`
[alice]
"team/**" = ["pull", "push", "delete"]
catalog = true

[bob]
"team/app" = ["pull"]
`), 0o600)
	users, err := registry.LoadHtpasswd(filepath.Join(dir, "htpasswd"))
	if err != nil {
		t.Fatal(err)
	}
	access, err := registry.LoadAccess(filepath.Join(dir, "access.toml"))
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Users: users, Access: access})
	tally := map[string]int{}
	defer func() { t.Logf("%d requests allowed, %d refused", tally["true"], tally["false"]) }()
	type who struct {
		name string
		pull map[string]bool // repo → may pull
		push map[string]bool
	}
	for _, w := range []who{
		{"alice", map[string]bool{"team/app": true}, map[string]bool{"team/app": true}},
		{"bob", map[string]bool{"team/app": true}, nil},
		{"carol", nil, nil},
		{"", nil, nil}, // anonymous
	} {
		for _, repo := range []string{"team/app", "other/app"} {
			for i, rt := range f.routes(t, repo) {
				hdr := map[string]string{}
				for k, v := range rt.hdr {
					hdr[k] = v
				}
				req, _ := http.NewRequest(rt.method, f.guarded.URL+rt.path, strings.NewReader(string(rt.body)))
				for k, v := range hdr {
					req.Header.Set(k, v)
				}
				if w.name != "" {
					req.SetBasicAuth(w.name, w.name+"-pw")
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				want := w.pull[repo]
				if i >= reads {
					want = w.push[repo]
				}
				tally[fmt.Sprintf("%v", allowedCode(resp.StatusCode))]++
				if got := allowedCode(resp.StatusCode); got != want {
					t.Errorf("%q %s %s: %d, want allowed=%v", w.name, rt.name, repo, resp.StatusCode, want)
				}
				if !want && w.name == "" && resp.StatusCode != http.StatusUnauthorized {
					t.Errorf("anonymous %s %s: %d, want 401", rt.name, repo, resp.StatusCode)
				}
				if !want && w.name != "" && resp.StatusCode != http.StatusForbidden {
					t.Errorf("%s %s %s: %d, want 403", w.name, rt.name, repo, resp.StatusCode)
				}
			}
		}
	}
	// The catalog: alice only.
	for name, want := range map[string]int{"alice": 200, "bob": 403} {
		req, _ := http.NewRequest("GET", f.guarded.URL+"/v2/_catalog", nil)
		req.SetBasicAuth(name, name+"-pw")
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != want {
			t.Errorf("%s catalog: %v %v, want %d", name, resp.StatusCode, err, want)
		}
	}
	// A cross-repository mount from a repository alice cannot pull is an
	// ordinary upload (202), not a link of the blob (201).
	mount := func(from string) int {
		req, _ := http.NewRequest("POST", f.guarded.URL+"/v2/team/new/blobs/uploads/?mount="+f.layer.String()+"&from="+from, nil)
		req.SetBasicAuth("alice", "alice-pw")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := mount("other/app"); code != http.StatusAccepted {
		t.Errorf("mount from a repository alice cannot read: %d, want 202", code)
	}
	if code := mount("team/app"); code != http.StatusCreated {
		t.Errorf("mount from a repository alice reads: %d, want 201", code)
	}
}

// tokenKit signs registry tokens with a key whose certificate the
// registry trusts.
type tokenKit struct {
	key, other *ecdsa.PrivateKey
	cert       string
}

func newTokenKit(t *testing.T) *tokenKit {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	o, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "token"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert := filepath.Join(t.TempDir(), "token.pem")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	return &tokenKit{key: k, other: o, cert: cert}
}

type accessEntry struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

func (k *tokenKit) sign(t *testing.T, key *ecdsa.PrivateKey, iss, aud string, exp time.Time, access ...accessEntry) string {
	claims := jwt.MapClaims{"iss": iss, "aud": aud, "sub": "alice", "exp": exp.Unix(), "nbf": time.Now().Add(-time.Minute).Unix(), "iat": time.Now().Unix(), "access": access}
	s, err := jwt.NewWithClaims(jwt.SigningMethodES256, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestTokenAuth: bearer tokens of the Docker token protocol are checked
// for signature, issuer, audience and expiry, and grant exactly the scopes
// they name; clients without one are challenged with the realm, service
// and the scope the request needs. Forged, tampered, unsigned, expired and
// misaddressed tokens are refused.
func TestTokenAuth(t *testing.T) {
	kit := newTokenKit(t)
	ta, err := registry.NewTokenAuth("https://auth.example/token", "issuer", "strata", kit.cert)
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Token: ta})
	get := func(path, token string) *http.Response {
		req, _ := http.NewRequest("GET", f.guarded.URL+path, nil)
		req.Header.Set("Accept", mtManifest)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	manifest := "/v2/team/app/manifests/v1"
	resp := get(manifest, "")
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != `Bearer realm="https://auth.example/token",service="strata",scope="repository:team/app:pull"` {
		t.Fatalf("no token: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	hour := time.Now().Add(time.Hour)
	pull := accessEntry{"repository", "team/app", []string{"pull"}}
	good := kit.sign(t, kit.key, "issuer", "strata", hour, pull)
	if resp := get(manifest, good); resp.StatusCode != 200 {
		t.Fatalf("valid token: %d", resp.StatusCode)
	}
	if resp := get("/v2/other/app/manifests/v1", good); resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`) {
		t.Errorf("token for team/app on other/app: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	req, _ := http.NewRequest("PUT", f.guarded.URL+"/v2/team/app/manifests/v2", strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+good)
	if resp, _ := http.DefaultClient.Do(req); resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `scope="repository:team/app:push"`) {
		t.Errorf("pull token pushing: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	parts := strings.Split(good, ".")
	tampered := parts[0] + "." + strings.TrimRight(jwtPart(t, `{"iss":"issuer","aud":"strata","exp":`+fmt.Sprint(hour.Unix())+`,"access":[{"type":"repository","name":"other/app","actions":["pull"]}]}`), "=") + "." + parts[2]
	none := jwtPart(t, `{"alg":"none","typ":"JWT"}`) + "." + jwtPart(t, `{"iss":"issuer","aud":"strata","exp":`+fmt.Sprint(hour.Unix())+`,"access":[{"type":"repository","name":"team/app","actions":["pull"]}]}`) + "."
	for name, tok := range map[string]string{
		"forged (another key)": kit.sign(t, kit.other, "issuer", "strata", hour, pull),
		"expired":              kit.sign(t, kit.key, "issuer", "strata", time.Now().Add(-2*time.Minute), pull),
		"wrong issuer":         kit.sign(t, kit.key, "someone", "strata", hour, pull),
		"wrong audience":       kit.sign(t, kit.key, "issuer", "another-registry", hour, pull),
		"tampered payload":     tampered,
		"alg none":             none,
		"garbage":              "not.a.token",
	} {
		resp := get(manifest, tok)
		if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("%s token: %d %q, want 401 invalid_token", name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}
	if resp := get("/v2/other/app/manifests/v1", tampered); resp.StatusCode != 401 {
		t.Errorf("tampered token read other/app: %d", resp.StatusCode)
	}
	// Catalog and the base route.
	if resp := get("/v2/_catalog", good); resp.StatusCode != 401 {
		t.Errorf("catalog without its scope: %d", resp.StatusCode)
	}
	cat := kit.sign(t, kit.key, "issuer", "strata", hour, accessEntry{"registry", "catalog", []string{"*"}})
	if resp := get("/v2/_catalog", cat); resp.StatusCode != 200 {
		t.Errorf("catalog token: %d", resp.StatusCode)
	}
	if resp := get("/v2/", ""); resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer ") {
		t.Errorf("base without a token: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	if resp := get("/v2/", good); resp.StatusCode != 200 {
		t.Errorf("base with a token: %d", resp.StatusCode)
	}
}

func jwtPart(t *testing.T, s string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(s))
}

// TestTokenServerClient: strata's own registry client (a node) pulls
// through a token server: challenged, it asks the realm for a token with
// its credentials and the scope, and pulls with it.
func TestTokenServerClient(t *testing.T) {
	kit := newTokenKit(t)
	var realm string
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		if !ok || user != "alice" || pass != "alice-pw" || r.URL.Query().Get("service") != "strata" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		var access []accessEntry
		for _, sc := range r.URL.Query()["scope"] {
			p := strings.Split(sc, ":")
			if len(p) == 3 && p[0] == "repository" && strings.HasPrefix(p[1], "team/") {
				access = append(access, accessEntry{"repository", p[1], strings.Split(p[2], ",")})
			}
		}
		json.NewEncoder(w).Encode(map[string]string{"token": kit.sign(t, kit.key, "issuer", "strata", time.Now().Add(time.Hour), access...)})
	}))
	defer tokens.Close()
	realm = tokens.URL + "/token"
	ta, err := registry.NewTokenAuth(realm, "issuer", "strata", kit.cert)
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Token: ta})
	host := strings.TrimPrefix(f.guarded.URL, "http://")
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback),
		Credentials: func(ctx context.Context, registry string) (remote.Credential, error) {
			return remote.Credential{Username: "alice", Password: "alice-pw"}, nil
		}})
	ref, _ := remote.ParseReference(host + "/team/app:v1")
	img, err := c.Resolve(context.Background(), ref)
	if err != nil || img.Digest != f.manifest {
		t.Fatalf("resolve through the token server: %v", err)
	}
	if _, err := c.Blob(context.Background(), ref.Repository, ocispec.Descriptor{Digest: f.config, Size: img.Manifest.Config.Size}, 1<<20); err != nil {
		t.Fatalf("blob through the token server: %v", err)
	}
	other, _ := remote.ParseReference(host + "/other/app:v1")
	if _, err := c.Resolve(context.Background(), other); err == nil {
		t.Fatal("resolved a repository the token server grants nothing on")
	}
}
