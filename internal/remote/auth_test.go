package remote_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
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
			c := newClient(t, remote.Options{Credentials: func(_ context.Context, registry string) (remote.Credential, error) {
				if registry != host {
					t.Errorf("credentials asked for %q, want %q", registry, host)
				}
				return tt.cred, nil
			}})
			_, err := c.Resolve(context.Background(), ref)
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

func TestDockerCredentials(t *testing.T) {
	auth := base64.StdEncoding.EncodeToString([]byte("u:p:with:colons"))
	tests := []struct {
		name     string
		config   string // "" for no file
		registry string
		want     remote.Credential
		logged   string
		err      bool
	}{
		{name: "no file", registry: "docker.io"},
		{name: "docker hub legacy key", config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + auth + `"}}}`, registry: "docker.io", want: remote.Credential{Username: "u", Password: "p:with:colons"}},
		{name: "host with port", config: `{"auths":{"localhost:5000":{"username":"a","password":"b"}}}`, registry: "localhost:5000", want: remote.Credential{Username: "a", Password: "b"}},
		{name: "other host", config: `{"auths":{"localhost:5000":{"username":"a","password":"b"}}}`, registry: "localhost:5001"},
		{name: "credential store", config: `{"auths":{"ghcr.io":{}},"credsStore":"desktop"}`, registry: "ghcr.io", logged: "helper=desktop"},
		{name: "credential helper", config: `{"credHelpers":{"gcr.io":"gcloud"}}`, registry: "gcr.io", logged: "helper=gcloud"},
		{name: "inline auth wins over helper", config: `{"auths":{"q.io":{"username":"a","password":"b"}},"credsStore":"desktop"}`, registry: "q.io", want: remote.Credential{Username: "a", Password: "b"}},
		{name: "bad json", config: `{"auths":`, registry: "q.io", err: true},
		{name: "bad base64", config: `{"auths":{"q.io":{"auth":"%%%"}}}`, registry: "q.io", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.config == "" {
				t.Setenv("DOCKER_CONFIG", t.TempDir())
			} else {
				writeDockerConfig(t, tt.config)
			}
			var logs bytes.Buffer
			creds := remote.DockerCredentials(slog.New(slog.NewTextHandler(&logs, nil)))
			got, err := creds(context.Background(), tt.registry)
			if tt.err != (err != nil) {
				t.Fatalf("err = %v, want error %v", err, tt.err)
			}
			if got != tt.want {
				t.Errorf("credential = %+v, want %+v", got, tt.want)
			}
			if !strings.Contains(logs.String(), tt.logged) {
				t.Errorf("log %q does not contain %q", logs.String(), tt.logged)
			}
		})
	}
}
