package remote_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/remote"
)

// tokenServer is a Docker-style token server: GET /token?service=&scope=
// with optional basic credentials, or POST with a refresh token.
type tokenServer struct {
	srv *httptest.Server

	mu        sync.Mutex
	user      string // required basic credentials; "" allows anonymous
	pass      string
	refresh   string // accepted refresh token for POST
	expiresIn int    // seconds; 0 is 300
	n         int
	requests  []tokenRequest
	valid     map[string]bool // tokens the registry front accepts
	rejectAll bool            // the front refuses even valid tokens
}

type tokenRequest struct {
	Method  string
	Service string
	Scopes  []string
	User    string
}

func newTokenServer(t *testing.T) *tokenServer {
	ts := &tokenServer{valid: map[string]bool{}}
	ts.srv = httptest.NewServer(http.HandlerFunc(ts.serve))
	t.Cleanup(ts.srv.Close)
	return ts
}

func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	tr := tokenRequest{Method: r.Method, Service: r.URL.Query().Get("service"), Scopes: r.URL.Query()["scope"]}
	user, pass, hasBasic := r.BasicAuth()
	tr.User = user
	if r.Method == http.MethodPost {
		r.ParseForm()
		tr.Service = r.PostForm.Get("service")
		tr.Scopes = strings.Fields(r.PostForm.Get("scope"))
		if r.PostForm.Get("grant_type") != "refresh_token" || r.PostForm.Get("refresh_token") != ts.refresh || ts.refresh == "" {
			ts.requests = append(ts.requests, tr)
			http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
			return
		}
	} else if ts.user != "" && (!hasBasic || user != ts.user || pass != ts.pass) {
		ts.requests = append(ts.requests, tr)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"incorrect username or password"}]}`)
		return
	}
	ts.requests = append(ts.requests, tr)
	ts.n++
	tok := fmt.Sprintf("tok-%d", ts.n)
	ts.valid[tok] = true
	exp := ts.expiresIn
	if exp == 0 {
		exp = 300
	}
	body := map[string]any{"expires_in": exp}
	if ts.n%2 == 0 {
		body["access_token"] = tok // the OAuth2 spelling
	} else {
		body["token"] = tok
	}
	json.NewEncoder(w).Encode(body)
}

func (ts *tokenServer) reqs() []tokenRequest {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]tokenRequest(nil), ts.requests...)
}

// bearerFront puts a bearer-token check in front of a registry.
func bearerFront(t *testing.T, ts *tokenServer, next http.Handler) (*httptest.Server, *atomic.Int64) {
	unauthorized := new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		ts.mu.Lock()
		ok := ts.valid[tok] && !ts.rejectAll
		ts.mu.Unlock()
		if !ok {
			unauthorized.Add(1)
			repo, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/manifests/")
			repo, _, _ = strings.Cut(repo, "/blobs/")
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="test-registry",scope="repository:%s:pull"`, ts.srv.URL, repo))
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		next.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, unauthorized
}

// writeDockerConfig writes a Docker config to a temp dir and points
// $DOCKER_CONFIG at it.
func writeDockerConfig(t *testing.T, cfg string) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
	t.Setenv("DOCKER_AUTH_CONFIG", "") // the docker CLI's credentials from the environment
}

// registryWithImage returns strata's registry, behind a proxy, with one
// image pushed to each of repos as v1.
func registryWithImage(t *testing.T, repos ...string) http.Handler {
	base, _ := newRegistry(t)
	img := buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false)
	for _, repo := range repos {
		img.push(t, base, repo, "v1")
	}
	return proxyTo(t, base)
}

// proxyTo forwards requests to base (the registry under test).
func proxyTo(t *testing.T, base string) http.Handler {
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	return httputil.NewSingleHostReverseProxy(u)
}

func TestBearerAuth(t *testing.T) {
	reg := registryWithImage(t, "team/app", "team/other")
	basicCfg := fmt.Sprintf(`{"auths":{"%%s":{"auth":%q}}}`, base64.StdEncoding.EncodeToString([]byte("alice:s3cret")))

	tests := []struct {
		name      string
		config    string // Docker config; %s is the registry host
		user      string // the token server's required user ("" anonymous)
		refresh   string // the token server's refresh token
		wantUser  string
		wantPost  bool
		wantErr   error
		wantCalls int // token requests of the first Resolve
	}{
		{name: "anonymous", config: `{}`, wantCalls: 1},
		{name: "basic credentials to the token server", config: basicCfg, user: "alice", wantUser: "alice", wantCalls: 1},
		{name: "username and password fields", config: `{"auths":{"http://%s":{"username":"alice","password":"s3cret"}}}`, user: "alice", wantUser: "alice", wantCalls: 1},
		{name: "identity token", config: `{"auths":{"%s":{"identitytoken":"refresh-me"}}}`, refresh: "refresh-me", wantPost: true, wantCalls: 1},
		{name: "wrong password", config: `{"auths":{"%s":{"username":"alice","password":"nope"}}}`, user: "alice", wantUser: "alice", wantErr: remote.ErrUnauthorized, wantCalls: 1},
		{name: "no credentials where needed", config: `{}`, user: "alice", wantErr: remote.ErrUnauthorized, wantCalls: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := newTokenServer(t)
			ts.user, ts.pass, ts.refresh = tt.user, "s3cret", tt.refresh
			front, unauthorized := bearerFront(t, ts, reg)
			host := hostOf(front)
			cfg := tt.config
			if strings.Contains(cfg, "%s") {
				cfg = fmt.Sprintf(cfg, host)
			}
			writeDockerConfig(t, cfg)
			c := newClient(t, remote.Options{Credentials: remote.DockerCredentials(nil)})
			ref := parseRef(t, host+"/team/app:v1")

			_, err := c.Resolve(context.Background(), ref)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Resolve = %v, want %v", err, tt.wantErr)
				}
				t.Log(err)
			} else if err != nil {
				t.Fatal(err)
			}
			reqs := ts.reqs()
			if len(reqs) != tt.wantCalls {
				t.Fatalf("%d token requests, want %d: %+v", len(reqs), tt.wantCalls, reqs)
			}
			method := http.MethodGet
			if tt.wantPost {
				method = http.MethodPost
			}
			want := tokenRequest{Method: method, Service: "test-registry", Scopes: []string{"repository:team/app:pull"}, User: tt.wantUser}
			if diff := cmp.Diff(want, reqs[0]); diff != "" {
				t.Errorf("token request mismatch (-want +got):\n%s", diff)
			}
			if tt.wantErr != nil {
				return
			}

			// The token is reused: no 401 and no token request for another call.
			before := unauthorized.Load()
			if _, err := c.Resolve(context.Background(), ref); err != nil {
				t.Fatal(err)
			}
			if n := len(ts.reqs()); n != 1 || unauthorized.Load() != before {
				t.Errorf("second Resolve: %d token requests, %d new 401s; want 1, 0", n, unauthorized.Load()-before)
			}

			// Another repository has its own scope.
			if _, err := c.Resolve(context.Background(), parseRef(t, host+"/team/other:v1")); err != nil {
				t.Fatal(err)
			}
			if reqs := ts.reqs(); len(reqs) != 2 || reqs[1].Scopes[0] != "repository:team/other:pull" {
				t.Errorf("other repository: token requests %+v", reqs)
			}
		})
	}
}

func TestBearerReauth(t *testing.T) {
	reg := registryWithImage(t, "team/app")
	ts := newTokenServer(t)
	front, unauthorized := bearerFront(t, ts, reg)
	host := hostOf(front)
	c := newClient(t, remote.Options{})
	// The client's clock for token lifetimes, moved by hand below.
	var clockMu sync.Mutex
	now := time.Now()
	remote.SetTokenClock(c, func() time.Time {
		clockMu.Lock()
		defer clockMu.Unlock()
		return now
	})
	ref := parseRef(t, host+"/team/app:v1")
	resolve := func() error { _, err := c.Resolve(context.Background(), ref); return err }

	if err := resolve(); err != nil {
		t.Fatal(err)
	}
	// The registry forgets its tokens: one 401, one new token, success.
	ts.mu.Lock()
	ts.valid = map[string]bool{}
	ts.mu.Unlock()
	before := unauthorized.Load()
	if err := resolve(); err != nil {
		t.Fatal(err)
	}
	if n := len(ts.reqs()); n != 2 || unauthorized.Load()-before != 1 {
		t.Errorf("after revocation: %d token requests, %d 401s; want 2, 1", n, unauthorized.Load()-before)
	}

	// A token past its expires_in is fetched anew before the request, without a 401.
	ts.mu.Lock()
	ts.expiresIn = 1
	ts.valid = map[string]bool{}
	ts.mu.Unlock()
	if err := resolve(); err != nil { // 401, a token for 1s
		t.Fatal(err)
	}
	clockMu.Lock()
	now = now.Add(time.Second)
	clockMu.Unlock()
	n, before := len(ts.reqs()), unauthorized.Load()
	if err := resolve(); err != nil {
		t.Fatal(err)
	}
	if got := len(ts.reqs()) - n; got != 1 || unauthorized.Load() != before {
		t.Errorf("expired token: %d new token requests, %d new 401s; want 1, 0", got, unauthorized.Load()-before)
	}
	ts.mu.Lock()
	ts.expiresIn = 0
	ts.mu.Unlock()

	// A registry that refuses every token: ErrUnauthorized after one re-auth.
	ts.mu.Lock()
	ts.rejectAll = true
	ts.mu.Unlock()
	n = len(ts.reqs())
	err := resolve()
	if !errors.Is(err, remote.ErrUnauthorized) {
		t.Fatalf("Resolve = %v, want ErrUnauthorized", err)
	}
	if got := len(ts.reqs()) - n; got != 1 {
		t.Errorf("refusing registry: %d token requests, want 1", got)
	}
	if !strings.Contains(err.Error(), "401 UNAUTHORIZED: authentication required") {
		t.Errorf("error %q does not carry the registry's message", err)
	}
}

func TestBasicAuth(t *testing.T) {
	reg := registryWithImage(t, "team/app")
	var seen []string
	var mu sync.Mutex
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		mu.Lock()
		seen = append(seen, user)
		mu.Unlock()
		if !ok || user != "bob" || pass != "hunter2" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	host := hostOf(front)
	ref := parseRef(t, host+"/team/app:v1")

	tests := []struct {
		name  string
		cred  remote.Credential
		ok    bool
		calls int
	}{
		{"right credentials", remote.Credential{Username: "bob", Password: "hunter2"}, true, 3}, // 401, manifest, config
		{"wrong credentials", remote.Credential{Username: "bob", Password: "nope"}, false, 2},
		{"no credentials", remote.Credential{}, false, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mu.Lock()
			seen = nil
			mu.Unlock()
			var asked atomic.Int64
			c := newClient(t, remote.Options{Credentials: func(_ context.Context, registry string) (remote.Credential, error) {
				asked.Add(1)
				if registry != host {
					t.Errorf("credentials asked for %q, want %q", registry, host)
				}
				return tt.cred, nil
			}})
			_, err := c.Resolve(context.Background(), ref)
			// Asked once, on the 401, not for each request: a credential
			// helper is a process.
			if n := asked.Load(); n != 1 {
				t.Errorf("credentials asked %d times, want 1", n)
			}
			if tt.ok != (err == nil) {
				t.Fatalf("Resolve = %v, want ok=%v", err, tt.ok)
			}
			if !tt.ok && !errors.Is(err, remote.ErrUnauthorized) {
				t.Errorf("Resolve = %v, want ErrUnauthorized", err)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(seen) != tt.calls {
				t.Errorf("%d requests (%q), want %d", len(seen), seen, tt.calls)
			}
		})
	}
}

// credentialHelper is docker-credential-test, a Docker credential helper
// written as a shell script into a temp dir that becomes all of PATH (so no
// helper installed on the machine answers instead). It answers "get" from
// the credentials set, "credentials not found" otherwise, and fails for
// fail.example; for slow.example it answers only after a few seconds.
type credentialHelper struct {
	dir string
}

func newCredentialHelper(t *testing.T) *credentialHelper {
	t.Helper()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	h := &credentialHelper{dir: t.TempDir()}
	script := fmt.Sprintf(`#!/bin/sh
[ "$1" = get ] || { echo "unsupported action $1"; exit 1; }
read -r url
echo "$url" >> %[1]s/calls
case "$url" in
fail.example) echo "the keychain is locked"; exit 1 ;;
slow.example) %[2]s 3; exit 1 ;;
esac
while read -r u user secret; do
	if [ "$u" = "$url" ]; then
		printf '{"ServerURL":"%%s","Username":"%%s","Secret":"%%s"}\n' "$url" "$user" "$secret"
		exit 0
	fi
done < %[1]s/creds
echo "credentials not found in native keychain"
exit 1
`, h.dir, sleep)
	if err := os.WriteFile(filepath.Join(h.dir, "docker-credential-test"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(h.dir, "creds"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", h.dir)
	return h
}

// set makes the helper answer user and secret for serverURL.
func (h *credentialHelper) set(t *testing.T, serverURL, user, secret string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(h.dir, "creds"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintf(f, "%s %s %s\n", serverURL, user, secret)
}

// calls returns the server URLs the helper was asked for.
func (h *credentialHelper) calls(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.dir, "calls"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b))
}

func TestDockerCredentials(t *testing.T) {
	auth := base64.StdEncoding.EncodeToString([]byte("u:p:with:colons"))
	tests := []struct {
		name     string
		config   string // "" for no file
		helper   [][3]string
		registry string
		want     remote.Credential
		asked    []string // server URLs the helper is asked for
		err      string   // the error, or "" for none
	}{
		{name: "no file", registry: "docker.io"},
		{name: "docker hub legacy key", config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + auth + `"}}}`, registry: "docker.io", want: remote.Credential{Username: "u", Password: "p:with:colons"}},
		{name: "docker hub alias", config: `{"auths":{"docker.io":{"username":"a","password":"b"}}}`, registry: "docker.io", want: remote.Credential{Username: "a", Password: "b"}},
		{name: "host with port", config: `{"auths":{"localhost:5000":{"username":"a","password":"b"}}}`, registry: "localhost:5000", want: remote.Credential{Username: "a", Password: "b"}},
		{name: "key with a scheme", config: `{"auths":{"http://localhost:5000":{"username":"a","password":"b"}}}`, registry: "localhost:5000", want: remote.Credential{Username: "a", Password: "b"}},
		{name: "other host", config: `{"auths":{"localhost:5000":{"username":"a","password":"b"}}}`, registry: "localhost:5001"},
		{name: "identity token", config: `{"auths":{"q.io":{"identitytoken":"refresh-me"}}}`, registry: "q.io", want: remote.Credential{IdentityToken: "refresh-me"}},
		{name: "bad json", config: `{"auths":`, registry: "q.io", err: "docker config: parsing config file"},
		{name: "bad base64", config: `{"auths":{"q.io":{"auth":"%%%"}}}`, registry: "q.io", err: "docker config: parsing config file"},

		{name: "credential store", config: `{"auths":{"ghcr.io":{}},"credsStore":"test"}`, helper: [][3]string{{"ghcr.io", "alice", "s3cret"}},
			registry: "ghcr.io", want: remote.Credential{Username: "alice", Password: "s3cret"}, asked: []string{"ghcr.io"}},
		{name: "credential store without the registry", config: `{"credsStore":"test"}`, helper: [][3]string{{"ghcr.io", "alice", "s3cret"}},
			registry: "quay.io", asked: []string{"quay.io"}},
		{name: "credential helper of the registry", config: `{"credHelpers":{"gcr.io":"test"},"credsStore":"strata-missing"}`, helper: [][3]string{{"gcr.io", "bob", "hunter2"}},
			registry: "gcr.io", want: remote.Credential{Username: "bob", Password: "hunter2"}, asked: []string{"gcr.io"}},
		{name: "credential store for the other registries", config: `{"credHelpers":{"gcr.io":"test"},"credsStore":"strata-missing"}`,
			registry: "quay.io", err: "credential helper docker-credential-strata-missing for quay.io: not found on PATH"},
		{name: "docker hub through a helper", config: `{"credHelpers":{"https://index.docker.io/v1/":"test"}}`, helper: [][3]string{{"https://index.docker.io/v1/", "carol", "pw"}},
			registry: "docker.io", want: remote.Credential{Username: "carol", Password: "pw"}, asked: []string{"https://index.docker.io/v1/"}},
		{name: "identity token from a helper", config: `{"credsStore":"test"}`, helper: [][3]string{{"q.io", "<token>", "refresh-me"}},
			registry: "q.io", want: remote.Credential{IdentityToken: "refresh-me"}, asked: []string{"q.io"}},
		{name: "helper wins over inline auth", config: `{"auths":{"q.io":{"username":"a","password":"b"}},"credsStore":"test"}`, helper: [][3]string{{"q.io", "c", "d"}},
			registry: "q.io", want: remote.Credential{Username: "c", Password: "d"}, asked: []string{"q.io"}},
		{name: "missing helper", config: `{"credHelpers":{"registry.example.com":"foo"}}`,
			registry: "registry.example.com", err: "credential helper docker-credential-foo for registry.example.com: not found on PATH"},
		{name: "failing helper", config: `{"credsStore":"test"}`,
			registry: "fail.example", asked: []string{"fail.example"}, err: "credential helper docker-credential-test for fail.example: the keychain is locked (exit status 1)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.config == "" {
				t.Setenv("DOCKER_CONFIG", t.TempDir())
			} else {
				writeDockerConfig(t, tt.config)
			}
			h := newCredentialHelper(t)
			for _, c := range tt.helper {
				h.set(t, c[0], c[1], c[2])
			}
			creds := remote.DockerCredentials(nil)
			got, err := creds(context.Background(), tt.registry)
			switch {
			case tt.err == "" && err != nil:
				t.Fatal(err)
			case tt.err != "" && err == nil:
				t.Fatalf("no error, want %q", tt.err)
			case tt.err != "" && !strings.HasPrefix(err.Error(), tt.err):
				t.Fatalf("error %q, want %q", err, tt.err)
			}
			if got != tt.want {
				t.Errorf("credential = %+v, want %+v", got, tt.want)
			}
			if diff := cmp.Diff(tt.asked, h.calls(t)); diff != "" {
				t.Errorf("helper asked (-want +got):\n%s", diff)
			}
		})
	}
}

// TestDockerCredentialsSlowHelper: a helper is waited for no longer than
// the caller's context.
func TestDockerCredentialsSlowHelper(t *testing.T) {
	writeDockerConfig(t, `{"credsStore":"test"}`)
	newCredentialHelper(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := remote.DockerCredentials(nil)(ctx, "slow.example")
	if !errors.Is(err, context.DeadlineExceeded) || !strings.HasPrefix(err.Error(), "credential helper docker-credential-test for slow.example: ") {
		t.Fatalf("error %v, want the helper named and DeadlineExceeded", err)
	}
}

// TestCredentialHelperPull: a registry asking for credentials is reached
// with a helper's, asked for once, and a helper that cannot answer fails
// the call at once, in one sentence.
func TestCredentialHelperPull(t *testing.T) {
	reg := registryWithImage(t, "team/app")
	ts := newTokenServer(t)
	ts.user, ts.pass = "alice", "s3cret"
	front, _ := bearerFront(t, ts, reg)
	host := hostOf(front)
	h := newCredentialHelper(t)
	h.set(t, host, "alice", "s3cret")
	writeDockerConfig(t, `{"credHelpers":{"`+host+`":"test"}}`)
	c := newClient(t, remote.Options{Credentials: remote.DockerCredentials(nil)})
	if _, err := c.Resolve(context.Background(), parseRef(t, host+"/team/app:v1")); err != nil {
		t.Fatal(err)
	}
	if got := h.calls(t); len(got) != 1 {
		t.Errorf("helper asked %q, want once", got)
	}

	writeDockerConfig(t, `{"credHelpers":{"`+host+`":"foo"}}`)
	c = newClient(t, remote.Options{Credentials: remote.DockerCredentials(nil)})
	_, err := c.Resolve(context.Background(), parseRef(t, host+"/team/app:v1"))
	want := fmt.Sprintf("resolve %[1]s/team/app:v1: credential helper docker-credential-foo for %[1]s: not found on PATH", host)
	if err == nil || err.Error() != want {
		t.Fatalf("Resolve = %v, want %q", err, want)
	}
}

// TestCredentialError: a failing CredentialFunc fails the call at once
// (not retried as a transient fault), in one sentence naming the registry.
func TestCredentialError(t *testing.T) {
	reg := registryWithImage(t, "team/app")
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok := r.BasicAuth(); !ok {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	host := hostOf(front)
	var asked atomic.Int64
	c := newClient(t, remote.Options{Credentials: func(context.Context, string) (remote.Credential, error) {
		asked.Add(1)
		return remote.Credential{}, errors.New("the keychain is locked")
	}})
	_, err := c.Resolve(context.Background(), parseRef(t, host+"/team/app:v1"))
	want := fmt.Sprintf("resolve %[1]s/team/app:v1: credentials for %[1]s: the keychain is locked", host)
	if err == nil || err.Error() != want {
		t.Fatalf("Resolve = %v, want %q", err, want)
	}
	if n := asked.Load(); n != 1 {
		t.Errorf("credentials asked %d times, want 1", n)
	}
}
