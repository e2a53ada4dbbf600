package remote

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Credential is what a client presents to a registry or its token server.
type Credential struct {
	Username, Password string
	// IdentityToken is an OAuth2 refresh token (docker login to some
	// registries stores one instead of a password).
	IdentityToken string
}

func (c Credential) empty() bool {
	return c.Username == "" && c.Password == "" && c.IdentityToken == ""
}

// CredentialFunc returns the credential for a registry host as written in
// references ("docker.io", "localhost:5000"). A zero Credential means
// anonymous access.
type CredentialFunc func(ctx context.Context, registry string) (Credential, error)

// DockerCredentials reads credentials from Docker's config file,
// $DOCKER_CONFIG/config.json or ~/.docker/config.json, on every call (so a
// later docker login is seen). Entries of "auths" with "auth" (base64
// user:password), "username"/"password" or "identitytoken" are used.
// Credential helpers (credsStore, credHelpers) are not run: such registries
// are reached anonymously, and logger says so. A missing file means anonymous.
func DockerCredentials(logger *slog.Logger) CredentialFunc {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return func(ctx context.Context, registry string) (Credential, error) {
		path := dockerConfigPath()
		if path == "" {
			return Credential{}, nil
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return Credential{}, nil
		}
		if err != nil {
			return Credential{}, fmt.Errorf("read docker config: %w", err)
		}
		cred, helper, err := parseDockerConfig(b, registry)
		if err != nil {
			return Credential{}, fmt.Errorf("docker config %s: %w", path, err)
		}
		if helper != "" {
			logger.InfoContext(ctx, "docker credential helpers are not supported; continuing anonymously",
				"registry", registry, "helper", helper, "config", path)
		}
		return cred, nil
	}
}

func dockerConfigPath() string {
	if dir := os.Getenv("DOCKER_CONFIG"); dir != "" {
		return filepath.Join(dir, "config.json")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".docker", "config.json")
}

type dockerConfig struct {
	Auths       map[string]dockerAuth `json:"auths"`
	CredsStore  string                `json:"credsStore"`
	CredHelpers map[string]string     `json:"credHelpers"`
}

type dockerAuth struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// parseDockerConfig returns the credential for registry, or the name of the
// credential helper that would have had it.
func parseDockerConfig(b []byte, registry string) (cred Credential, helper string, err error) {
	var cfg dockerConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cred, "", err
	}
	want := normalizeAuthKey(registry)
	for key, a := range cfg.Auths {
		if normalizeAuthKey(key) != want {
			continue
		}
		cred = Credential{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(a.Auth))
			if err != nil {
				return Credential{}, "", fmt.Errorf("auths[%q].auth is not base64: %v", key, err)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return Credential{}, "", fmt.Errorf("auths[%q].auth is not user:password", key)
			}
			cred.Username, cred.Password = user, pass
		}
		if !cred.empty() {
			return cred, "", nil
		}
	}
	for key, h := range cfg.CredHelpers {
		if normalizeAuthKey(key) == want {
			return Credential{}, h, nil
		}
	}
	if cfg.CredsStore != "" {
		return Credential{}, cfg.CredsStore, nil
	}
	return Credential{}, "", nil
}

// normalizeAuthKey reduces a key of "auths" ("https://index.docker.io/v1/",
// "http://host:5000") to a registry host, Docker Hub's aliases to docker.io.
func normalizeAuthKey(k string) string {
	k = strings.TrimPrefix(strings.TrimPrefix(k, "https://"), "http://")
	k, _, _ = strings.Cut(k, "/")
	switch k {
	case "index.docker.io", dockerHubAPI:
		return DockerHub
	}
	return k
}

// ---- challenges ----

// challenge is one parsed WWW-Authenticate challenge.
type challenge struct {
	scheme string // lower case: "bearer", "basic"
	params map[string]string
}

// parseChallenges parses WWW-Authenticate header values (RFC 7235), e.g.
// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`.
func parseChallenges(values []string) []challenge {
	var out []challenge
	for _, v := range values {
		s := v
		for {
			s = strings.TrimLeft(s, " \t,")
			if s == "" {
				break
			}
			i := strings.IndexAny(s, " \t")
			var scheme string
			if i < 0 {
				scheme, s = s, ""
			} else {
				scheme, s = s[:i], s[i:]
			}
			c := challenge{scheme: strings.ToLower(scheme), params: map[string]string{}}
			// Parameters until the next token not followed by '='.
			for {
				rest := strings.TrimLeft(s, " \t,")
				eq := strings.IndexByte(rest, '=')
				sp := strings.IndexAny(rest, " \t,")
				if rest == "" || eq <= 0 || (sp >= 0 && sp < eq) {
					s = rest
					break
				}
				key := strings.ToLower(strings.TrimSpace(rest[:eq]))
				rest = strings.TrimLeft(rest[eq+1:], " \t")
				var val string
				if strings.HasPrefix(rest, `"`) {
					var b strings.Builder
					j := 1
					for ; j < len(rest); j++ {
						if rest[j] == '\\' && j+1 < len(rest) {
							j++
							b.WriteByte(rest[j])
							continue
						}
						if rest[j] == '"' {
							break
						}
						b.WriteByte(rest[j])
					}
					val = b.String()
					rest = rest[min(j+1, len(rest)):]
				} else {
					end := strings.IndexAny(rest, ", \t")
					if end < 0 {
						end = len(rest)
					}
					val, rest = rest[:end], rest[end:]
				}
				c.params[key] = val
				s = rest
			}
			out = append(out, c)
		}
	}
	return out
}

// ---- tokens ----

type token struct {
	value   string
	expires time.Time
}

// authState is what a client learned about registries' authentication:
// each host's challenge and the bearer tokens it was given, per scope.
type authState struct {
	// now is the clock token lifetimes are measured by; nil is time.Now.
	now func() time.Time

	mu         sync.Mutex
	challenges map[string]challenge // by registry
	tokens     map[string]token     // by registry + " " + scope
}

func (a *authState) clock() time.Time {
	if a.now != nil {
		return a.now()
	}
	return time.Now()
}

func (a *authState) challenge(registry string) (challenge, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.challenges[registry]
	return c, ok
}

func (a *authState) setChallenge(registry string, c challenge) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.challenges == nil {
		a.challenges = map[string]challenge{}
	}
	a.challenges[registry] = c
}

func (a *authState) token(registry, scope string) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.tokens[registry+" "+scope]
	if !ok || !a.clock().Before(t.expires) {
		return "", false
	}
	return t.value, true
}

func (a *authState) setToken(registry, scope string, t token) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.tokens == nil {
		a.tokens = map[string]token{}
	}
	a.tokens[registry+" "+scope] = t
}

func (a *authState) dropToken(registry, scope string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.tokens, registry+" "+scope)
}

const maxTokenBody = 1 << 20

// fetchToken runs Docker's token flow against the challenge's realm: a GET
// with service and scope (basic credentials if any), or, with an identity
// token, the OAuth2 refresh-token POST.
func (c *Client) fetchToken(ctx context.Context, registry string, ch challenge, scope string, cred Credential) (token, error) {
	realm := ch.params["realm"]
	u, err := url.Parse(realm)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return token{}, fmt.Errorf("%w: bad bearer realm %q from %s", ErrInvalidResponse, realm, registry)
	}
	var scopes []string
	if scope != "" {
		scopes = append(scopes, scope)
	}
	if s := ch.params["scope"]; s != "" && s != scope {
		scopes = append(scopes, strings.Fields(s)...)
	}
	service := ch.params["service"]
	var req *http.Request
	if cred.IdentityToken != "" {
		form := url.Values{}
		form.Set("grant_type", "refresh_token")
		form.Set("refresh_token", cred.IdentityToken)
		form.Set("client_id", "strata")
		if service != "" {
			form.Set("service", service)
		}
		if len(scopes) > 0 {
			form.Set("scope", strings.Join(scopes, " "))
		}
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, u.String(), strings.NewReader(form.Encode()))
		if err != nil {
			return token{}, err
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	} else {
		q := u.Query()
		if service != "" {
			q.Set("service", service)
		}
		for _, s := range scopes {
			q.Add("scope", s)
		}
		u.RawQuery = q.Encode()
		req, err = http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return token{}, err
		}
		if cred.Username != "" || cred.Password != "" {
			req.SetBasicAuth(cred.Username, cred.Password)
		}
	}
	req.Header.Set("User-Agent", c.userAgent)
	sent := c.auth.clock()
	resp, err := c.http.Do(req)
	if err != nil {
		return token{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenBody))
	if err != nil {
		return token{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return token{}, newError(resp, body)
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.Unmarshal(body, &tr); err != nil {
		return token{}, fmt.Errorf("%w: token from %s: %v", ErrInvalidResponse, redact(req.URL.String()), err)
	}
	t := token{value: tr.Token}
	if t.value == "" {
		t.value = tr.AccessToken
	}
	if t.value == "" {
		return token{}, fmt.Errorf("%w: token server %s returned no token", ErrInvalidResponse, redact(req.URL.String()))
	}
	// The spec's default lifetime is 60 s. It counts from when the request
	// was sent, not from issued_at: the token server's clock may disagree
	// with ours. A margin covers the trip to the registry.
	life := 60 * time.Second
	if tr.ExpiresIn > 0 {
		life = time.Duration(tr.ExpiresIn) * time.Second
	}
	t.expires = sent.Add(life - min(life/10, 10*time.Second))
	return t, nil
}
