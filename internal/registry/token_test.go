package registry_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// tokenReq sends method path to srv with token (none if empty) and body,
// and returns the status and the challenge.
func tokenReq(t *testing.T, srv *httptest.Server, method, path, token string, hdr map[string]string, body []byte) (int, string) {
	t.Helper()
	h := map[string]string{}
	for k, v := range hdr {
		h[k] = v
	}
	if token != "" {
		h["Authorization"] = "Bearer " + token
	}
	r := do(t, method, srv.URL+path, h, body)
	return r.code, r.hdr.Get("WWW-Authenticate")
}

// TestTokenRoutes: with token auth, every route asks for the scope of
// what it does (the challenge names it), a token granting exactly that
// scope passes, and one granting all of it but one action is challenged
// again (401 insufficient_scope): the distribution API, the strata
// extension (layer mount, index, profile), uploads in progress, the
// catalog, and the routes of no repository.
func TestTokenRoutes(t *testing.T) {
	kit := newTokenKit(t)
	ta, err := registry.NewTokenAuth("https://auth.example/token", "issuer", "strata", kit.cert)
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Token: ta})
	hour := time.Now().Add(time.Hour)
	token := func(name string, actions ...string) string {
		return kit.sign(t, kit.key, "issuer", "strata", hour, accessEntry{"repository", name, actions})
	}
	// An upload session in team/app, opened on the open server.
	up := do(t, "POST", f.open.URL+"/v2/team/app/blobs/uploads/", nil, nil)
	if up.code != http.StatusAccepted {
		t.Fatalf("open an upload: %d", up.code)
	}
	session := up.hdr.Get("Location")
	mb := []byte(do(t, "GET", f.open.URL+"/v2/team/app/manifests/v1", map[string]string{"Accept": mtManifest}, nil).body)
	ct := map[string]string{"Content-Type": mtManifest}
	for _, rt := range []struct {
		name, method, path string
		hdr                map[string]string
		body               []byte
		actions            []string // on team/app
	}{
		{"manifest GET", "GET", "/v2/team/app/manifests/v1", map[string]string{"Accept": mtManifest}, nil, []string{"pull"}},
		{"manifest HEAD", "HEAD", "/v2/team/app/manifests/v1", nil, nil, []string{"pull"}},
		{"blob GET", "GET", "/v2/team/app/blobs/" + f.layer.String(), nil, nil, []string{"pull"}},
		{"blob HEAD", "HEAD", "/v2/team/app/blobs/" + f.config.String(), nil, nil, []string{"pull"}},
		{"tags", "GET", "/v2/team/app/tags/list", nil, nil, []string{"pull"}},
		{"referrers", "GET", "/v2/team/app/referrers/" + f.manifest.String(), nil, nil, []string{"pull"}},
		{"layer mount", "POST", api.MountPath("team/app", f.layer), nil, nil, []string{"pull"}},
		{"layer index", "GET", api.IndexPath("team/app", f.layer), nil, nil, []string{"pull"}},
		{"profile GET", "GET", api.ProfilePath("team/app", f.manifest), nil, nil, []string{"pull"}},
		{"profile PUT", "PUT", api.ProfilePath("team/app", f.manifest), map[string]string{"Content-Type": "application/json"}, []byte(`{"version":0,"layers":[]}`), []string{"push"}},
		{"manifest PUT", "PUT", "/v2/team/app/manifests/v2", ct, mb, []string{"push"}},
		{"upload POST", "POST", "/v2/team/app/blobs/uploads/", nil, nil, []string{"pull", "push"}},
		{"upload GET", "GET", session, nil, nil, []string{"pull", "push"}},
		{"upload PATCH", "PATCH", session, nil, []byte("x"), []string{"pull", "push"}},
		{"upload PUT", "PUT", session + "?digest=" + digest.FromString("x").String(), nil, nil, []string{"pull", "push"}},
		{"manifest DELETE", "DELETE", "/v2/team/app/manifests/v2", nil, nil, []string{"delete"}},
		{"blob DELETE", "DELETE", "/v2/team/app/blobs/" + digest.FromString("nothing").String(), nil, nil, []string{"delete"}},
	} {
		t.Run(rt.name, func(t *testing.T) {
			scope := `scope="repository:team/app:` + strings.Join(rt.actions, ",") + `"`
			code, ch := tokenReq(t, f.guarded, rt.method, rt.path, "", rt.hdr, rt.body)
			if code != http.StatusUnauthorized || !strings.Contains(ch, scope) || strings.Contains(ch, "error=") {
				t.Errorf("no token: %d %q, want 401 with %s", code, ch, scope)
			}
			for i := range rt.actions {
				fewer := slices.Delete(slices.Clone(rt.actions), i, i+1)
				// The other actions, and the actions on another repository.
				for _, tok := range []string{token("team/app", append(fewer, otherActions(rt.actions)...)...), token("other/app", rt.actions...)} {
					code, ch := tokenReq(t, f.guarded, rt.method, rt.path, tok, rt.hdr, rt.body)
					if code != http.StatusUnauthorized || !strings.Contains(ch, scope) || !strings.Contains(ch, `error="insufficient_scope"`) {
						t.Errorf("without %s: %d %q, want 401 insufficient_scope with %s", rt.actions[i], code, ch, scope)
					}
				}
			}
			if code, ch := tokenReq(t, f.guarded, rt.method, rt.path, token("team/app", rt.actions...), rt.hdr, rt.body); !allowedCode(code) {
				t.Errorf("with %v: %d %q", rt.actions, code, ch)
			}
			if code, ch := tokenReq(t, f.guarded, rt.method, rt.path, token("team/app", "*"), rt.hdr, rt.body); !allowedCode(code) {
				t.Errorf("with *: %d %q", code, ch)
			}
		})
	}
	// Routes of no repository: the base and the extension's info need a
	// token (any); the catalog needs registry:catalog:*; an unknown
	// extension route of no repository serves nothing.
	none := kit.sign(t, kit.key, "issuer", "strata", hour)
	for _, rt := range []struct {
		path          string
		anon, withAny int
		scope         string
	}{
		{"/v2/", 401, 200, ""},
		{api.InfoPath, 401, 200, ""},
		{"/v2/_strata/layers/" + f.layer.String() + "/index", 401, 404, ""},
		{"/v2/_strata/layers/" + f.layer.String() + "/mount", 401, 404, ""},
		{"/v2/_catalog", 401, 401, `scope="registry:catalog:*"`},
	} {
		if code, ch := tokenReq(t, f.guarded, "GET", rt.path, "", nil, nil); code != rt.anon || !strings.Contains(ch, rt.scope) || rt.scope == "" && strings.Contains(ch, "scope=") {
			t.Errorf("GET %s without a token: %d %q, want %d", rt.path, code, ch, rt.anon)
		}
		if code, ch := tokenReq(t, f.guarded, "GET", rt.path, none, nil, nil); code != rt.withAny {
			t.Errorf("GET %s with a token of no access: %d %q, want %d", rt.path, code, ch, rt.withAny)
		}
	}
	for _, actions := range [][]string{{"pull"}, {}} {
		cat := kit.sign(t, kit.key, "issuer", "strata", hour, accessEntry{"registry", "catalog", actions})
		if code, _ := tokenReq(t, f.guarded, "GET", "/v2/_catalog", cat, nil, nil); code != http.StatusUnauthorized {
			t.Errorf("catalog with registry:catalog:%v: %d, want 401", actions, code)
		}
	}
	// A token naming a pattern grants that name only.
	glob := kit.sign(t, kit.key, "issuer", "strata", hour, accessEntry{"repository", "team/*", []string{"pull"}})
	if code, _ := tokenReq(t, f.guarded, "GET", "/v2/team/app/tags/list", glob, nil, nil); code != http.StatusUnauthorized {
		t.Errorf("a token for repository team/* read team/app: %d", code)
	}
}

// otherActions are the actions not in actions (pull, push, delete).
func otherActions(actions []string) []string {
	var o []string
	for _, a := range []string{"pull", "push", "delete"} {
		if !slices.Contains(actions, a) {
			o = append(o, a)
		}
	}
	return o
}

// TestTokenMount: a cross-repository mount with a token needs pull on the
// source as well as push on the target; without it the request opens an
// ordinary upload session (202) and the blob is not linked.
func TestTokenMount(t *testing.T) {
	kit := newTokenKit(t)
	ta, err := registry.NewTokenAuth("https://auth.example/token", "issuer", "strata", kit.cert)
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Token: ta})
	hour := time.Now().Add(time.Hour)
	push := accessEntry{"repository", "team/new", []string{"pull", "push"}}
	mount := "/v2/team/new/blobs/uploads/?mount=" + f.layer.String() + "&from=other/app"
	for _, tc := range []struct {
		name   string
		access []accessEntry
		want   int
	}{
		{"push only", []accessEntry{push}, http.StatusAccepted},
		{"push and delete on the source", []accessEntry{push, {"repository", "other/app", []string{"push", "delete"}}}, http.StatusAccepted},
		{"pull on another repository", []accessEntry{push, {"repository", "other/app2", []string{"pull"}}}, http.StatusAccepted},
		{"pull on the source", []accessEntry{push, {"repository", "other/app", []string{"pull"}}}, http.StatusCreated},
	} {
		tok := kit.sign(t, kit.key, "issuer", "strata", hour, tc.access...)
		if code, _ := tokenReq(t, f.guarded, "POST", mount, tok, nil, nil); code != tc.want {
			t.Errorf("%s: mount %d, want %d", tc.name, code, tc.want)
		}
		read := kit.sign(t, kit.key, "issuer", "strata", hour, push)
		code, _ := tokenReq(t, f.guarded, "HEAD", "/v2/team/new/blobs/"+f.layer.String(), read, nil, nil)
		if linked := code == http.StatusOK; linked != (tc.want == http.StatusCreated) {
			t.Errorf("%s: the blob in team/new: %d", tc.name, code)
		}
	}
	// Without a token the mount is challenged for the target's scope
	// and the source's pull, as distribution does: a client learns to ask
	// for both.
	if code, ch := tokenReq(t, f.guarded, "POST", mount, "", nil, nil); code != 401 || !strings.Contains(ch, `scope="repository:team/new:pull,push repository:other/app:pull"`) {
		t.Errorf("mount without a token: %d %q", code, ch)
	}
}

// TestTokenKeys: the key file may hold certificates and public keys of
// RSA, ECDSA and Ed25519, and a token signed by any of them with its
// algorithm is taken; a token must expire, may not be used before its
// nbf, and a minute of clock skew is allowed. The HMAC algorithms are
// refused (a token "signed" with the public key as an HMAC secret is the
// classic forgery), and so is a key of one kind used with the algorithm of
// another.
func TestTokenKeys(t *testing.T) {
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	var bundle []byte
	for _, k := range []crypto.PublicKey{rsaKey.Public(), edKey.Public(), ecKey.Public()} {
		der, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			t.Fatal(err)
		}
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})...)
	}
	file := filepath.Join(t.TempDir(), "keys.pem")
	os.WriteFile(file, bundle, 0o644)
	ta, err := registry.NewTokenAuth("https://auth.example/token", "issuer", "strata", file)
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Token: ta})
	now := time.Now()
	claims := func(exp, nbf time.Time) jwt.MapClaims {
		c := jwt.MapClaims{"iss": "issuer", "aud": []string{"other", "strata"}, "sub": "alice",
			"access": []accessEntry{{"repository", "team/app", []string{"pull"}}}}
		if !exp.IsZero() {
			c["exp"] = exp.Unix()
		}
		if !nbf.IsZero() {
			c["nbf"] = nbf.Unix()
		}
		return c
	}
	sign := func(m jwt.SigningMethod, key any, c jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(m, c).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	valid := claims(now.Add(time.Hour), time.Time{})
	otherRSA, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, tc := range []struct {
		name  string
		token string
		ok    bool
	}{
		{"RS256", sign(jwt.SigningMethodRS256, rsaKey, valid), true},
		{"PS256", sign(jwt.SigningMethodPS256, rsaKey, valid), true},
		{"EdDSA", sign(jwt.SigningMethodEdDSA, edKey, valid), true},
		{"ES384", sign(jwt.SigningMethodES384, ecKey, valid), true},
		{"expired within the leeway", sign(jwt.SigningMethodRS256, rsaKey, claims(now.Add(-30*time.Second), time.Time{})), true},
		{"RS256 by another key", sign(jwt.SigningMethodRS256, otherRSA, valid), false},
		{"ES256 with a P-384 key's signature", strings.Replace(sign(jwt.SigningMethodES384, ecKey, valid), jwtPart(t, `{"alg":"ES384","typ":"JWT"}`), jwtPart(t, `{"alg":"ES256","typ":"JWT"}`), 1), false},
		{"HS256 keyed with the public key file", sign(jwt.SigningMethodHS256, bundle, valid), false},
		{"HS256 keyed with the RSA key's DER", sign(jwt.SigningMethodHS256, x509.MarshalPKCS1PublicKey(&rsaKey.PublicKey), valid), false},
		{"no exp", sign(jwt.SigningMethodRS256, rsaKey, claims(time.Time{}, time.Time{})), false},
		{"nbf in an hour", sign(jwt.SigningMethodRS256, rsaKey, claims(now.Add(2*time.Hour), now.Add(time.Hour))), false},
	} {
		code, ch := tokenReq(t, f.guarded, "GET", "/v2/team/app/tags/list", tc.token, nil, nil)
		if (code == http.StatusOK) != tc.ok {
			t.Errorf("%s: %d %q, want ok=%v", tc.name, code, ch, tc.ok)
		}
		if !tc.ok && !strings.Contains(ch, `error="invalid_token"`) {
			t.Errorf("%s: challenge %q, want invalid_token", tc.name, ch)
		}
	}
	for name, content := range map[string]string{
		"empty":         "",
		"not PEM":       "hello",
		"a private key": string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)})),
		"bad cert":      "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
	} {
		file := filepath.Join(t.TempDir(), "bad.pem")
		os.WriteFile(file, []byte(content), 0o644)
		if _, err := registry.NewTokenAuth("https://auth.example/token", "issuer", "strata", file); err == nil {
			t.Errorf("token cert %s: no error", name)
		}
	}
}

// TestTokenServerNode: a node's whole use of a registry behind a token
// server, strata's routes included: the extension's info, a layer mount,
// the layer index and the start-up profile (read, and stored: a push).
// The token server grants pull on team/* and push on team/app only.
func TestTokenServerNode(t *testing.T) {
	kit := newTokenKit(t)
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		access := []accessEntry{}
		if user, pass, ok := r.BasicAuth(); ok && user == "node" && pass == "node-pw" {
			for _, sc := range r.URL.Query()["scope"] {
				for _, s := range strings.Fields(sc) {
					p := strings.Split(s, ":")
					if len(p) != 3 || p[0] != "repository" || !strings.HasPrefix(p[1], "team/") {
						continue
					}
					var granted []string
					for _, a := range strings.Split(p[2], ",") {
						if a == "pull" || a == "push" && p[1] == "team/app" {
							granted = append(granted, a)
						}
					}
					access = append(access, accessEntry{"repository", p[1], granted})
				}
			}
		} else {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"token": kit.sign(t, kit.key, "issuer", "strata", time.Now().Add(time.Hour), access...), "expires_in": 3600})
	}))
	defer tokens.Close()
	ta, err := registry.NewTokenAuth(tokens.URL+"/token", "issuer", "strata", kit.cert)
	if err != nil {
		t.Fatal(err)
	}
	f := newAuthFixture(t, registry.ServeConfig{Token: ta})
	host := strings.TrimPrefix(f.guarded.URL, "http://")
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback),
		Credentials: func(context.Context, string) (remote.Credential, error) {
			return remote.Credential{Username: "node", Password: "node-pw"}, nil
		}})
	ctx := context.Background()
	if info, ok, err := c.Info(ctx, host); err != nil || !ok || len(info.Versions) == 0 {
		t.Fatalf("info: %v %v %v", info, ok, err)
	}
	ref, _ := remote.ParseReference(host + "/team/app:v1")
	md, err := c.Mount(ctx, ref.Repository, f.layer)
	if err != nil {
		t.Fatalf("layer mount: %v", err)
	}
	if d, _, err := c.LayerIndex(ctx, ref.Repository, f.layer); err != nil || d != md.Index.Digest {
		t.Fatalf("layer index: %v %v, want %s", d, err, md.Index.Digest)
	}
	p := &api.Profile{Version: layerindex.Version}
	if err := c.PutProfile(ctx, ref.Repository, f.manifest, p); err != nil {
		t.Fatalf("store a profile: %v", err)
	}
	if _, err := c.Profile(ctx, ref.Repository, f.manifest); err != nil {
		t.Fatalf("read the profile: %v", err)
	}
	// other/app: nothing granted.
	other, _ := remote.ParseReference(host + "/other/app:v1")
	if _, err := c.Mount(ctx, other.Repository, f.layer); err == nil {
		t.Error("mounted a layer of a repository the token server grants nothing on")
	}
}
