package remote

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/docker/cli/cli/config"
	"github.com/docker/cli/cli/config/configfile"
	"github.com/docker/cli/cli/config/types"
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

// imageRefKey is the context key of WithImageRef.
type imageRefKey struct{}

// WithImageRef returns ctx naming the image reference a request is made
// for, so that a CredentialFunc can answer with that image's credentials
// (a Kubernetes pull secret is given per image, not per registry).
func WithImageRef(ctx context.Context, ref string) context.Context {
	return context.WithValue(ctx, imageRefKey{}, ref)
}

// ImageRefFrom returns the image reference WithImageRef put in ctx, or "".
func ImageRefFrom(ctx context.Context) string {
	s, _ := ctx.Value(imageRefKey{}).(string)
	return s
}

// CredentialFunc returns the credential for a registry host as written in
// references ("docker.io", "localhost:5000"). A zero Credential means
// anonymous access; an error (one that names the registry reads best) fails
// the request that needed it.
type CredentialFunc func(ctx context.Context, registry string) (Credential, error)

// DockerCredentials finds credentials as Docker's own tools do, through
// docker/cli's config package, reading $DOCKER_CONFIG/config.json or
// ~/.docker/config.json on every call (so a later docker login is seen):
//
//   - the registry's entry of "credHelpers", else "credsStore", names a
//     credential helper, docker-credential-<name> on PATH, which is run with
//     "get" and answers for the registry ("<token>" as the user name means an
//     identity token);
//   - without a helper, the registry's entry of "auths": "auth" (base64
//     user:password), "username"/"password", "identitytoken".
//
// Docker Hub ("docker.io") is looked up under Docker's key for it,
// "https://index.docker.io/v1/"; other registries under their host
// ("localhost:5000"; an "auths" key with a scheme, "http://localhost:5000",
// matches too). A missing file, no entry, or a helper answering "credentials
// not found" means anonymous access. A helper missing from PATH, failing or
// outlasting ctx is an error naming the helper and the registry. Unlike the
// docker CLI, no helper is guessed when the file names none.
func DockerCredentials(logger *slog.Logger) CredentialFunc {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return func(ctx context.Context, registry string) (Credential, error) {
		dir := dockerConfigDir()
		if dir == "" {
			return Credential{}, nil
		}
		cf, err := config.Load(dir)
		if err != nil {
			return Credential{}, fmt.Errorf("docker config: %w", err)
		}
		helper := dockerHelper(cf, registry)
		if helper == "" {
			ac, err := cf.GetAuthConfig(registry)
			if err != nil {
				return Credential{}, fmt.Errorf("docker config %s: %w", cf.Filename, err)
			}
			cred := credentialOf(ac)
			if cred.empty() && registry == DockerHub {
				cred = dockerHubAlias(cf)
			}
			return cred, nil
		}
		// A helper may hang (a keychain waiting to be unlocked): wait for it
		// no longer than ctx. The library runs it without a context; one
		// left behind ends on its own.
		type answer struct {
			ac  types.AuthConfig
			err error
		}
		done := make(chan answer, 1)
		go func() {
			ac, err := cf.GetAuthConfig(registry)
			done <- answer{ac, err}
		}()
		select {
		case a := <-done:
			if a.err != nil {
				return Credential{}, fmt.Errorf("credential helper %s for %s: %s", helper, registry, helperFailure(helper, a.err))
			}
			cred := credentialOf(a.ac)
			logger.DebugContext(ctx, "credentials from a docker credential helper",
				"registry", registry, "helper", helper, "found", !cred.empty())
			return cred, nil
		case <-ctx.Done():
			return Credential{}, fmt.Errorf("credential helper %s for %s: %w", helper, registry, context.Cause(ctx))
		}
	}
}

// dockerConfigDir is Docker's config directory: $DOCKER_CONFIG, else
// ~/.docker. (config.Dir reads the environment only once per process.)
func dockerConfigDir() string {
	if dir := os.Getenv(config.EnvOverrideConfigDir); dir != "" {
		return dir
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".docker")
}

// dockerHubKey is Docker Hub's key in Docker's config file.
const dockerHubKey = "https://index.docker.io/v1/"

// dockerHelper returns the full name of the credential helper cf has the
// docker CLI run for registry, or "" when credentials come from the file.
func dockerHelper(cf *configfile.ConfigFile, registry string) string {
	key := registry
	if registry == DockerHub {
		key = dockerHubKey
	}
	name := cf.CredentialHelpers[key]
	if name == "" {
		name = cf.CredentialsStore
	}
	if name == "" {
		return ""
	}
	return "docker-credential-" + name
}

// helperFailure says in a few words why helper failed. The helpers client
// reports "error getting credentials - err: exit status 1, out: `…`".
func helperFailure(helper string, err error) string {
	if _, lookErr := exec.LookPath(helper); lookErr != nil {
		return "not found on PATH"
	}
	msg := err.Error()
	rest, ok := strings.CutPrefix(msg, "error getting credentials - err: ")
	if !ok {
		return msg
	}
	cause, out, ok := strings.Cut(rest, ", out: `")
	if !ok {
		return msg
	}
	if out = strings.TrimSpace(strings.TrimSuffix(out, "`")); out != "" {
		return out + " (" + cause + ")"
	}
	return cause
}

// dockerHubAlias returns the credential of an "auths" entry naming Docker
// Hub other than by Docker's key ("docker.io", "index.docker.io",
// "registry-1.docker.io"), which strata has always accepted and the docker
// CLI ignores.
func dockerHubAlias(cf *configfile.ConfigFile) Credential {
	for key, ac := range cf.AuthConfigs {
		if cred := credentialOf(ac); normalizeAuthKey(key) == DockerHub && !cred.empty() {
			return cred
		}
	}
	return Credential{}
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

func credentialOf(ac types.AuthConfig) Credential {
	return Credential{Username: ac.Username, Password: ac.Password, IdentityToken: ac.IdentityToken}
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
// each host's challenge, the bearer tokens it was given, per scope, and the
// credential a registry asking for basic auth is sent (asked for again
// only when the registry refuses it: a credential helper is a process).
type authState struct {
	// now is the clock token lifetimes are measured by; nil is time.Now.
	now func() time.Time

	mu         sync.Mutex
	challenges map[string]challenge  // by registry
	tokens     map[string]token      // by registry + " " + scope
	basic      map[string]Credential // by registry
}

func (a *authState) basicCredential(registry string) (Credential, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.basic[registry]
	return c, ok
}

func (a *authState) setBasicCredential(registry string, c Credential) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.basic == nil {
		a.basic = map[string]Credential{}
	}
	a.basic[registry] = c
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
func (c *Client) fetchToken(ctx context.Context, r request, ch challenge, cred Credential) (token, error) {
	registry, scope := r.authKey(), r.scope
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
	resp, err := c.httpClient(r).Do(req)
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
