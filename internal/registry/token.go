package registry

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// TokenAuth checks bearer tokens of the Docker registry token protocol
// (https://distribution.github.io/distribution/spec/auth/token/): JWTs a
// token server signs, naming in their access claim the actions granted on
// repositories. Clients without one are sent to Realm.
type TokenAuth struct {
	Realm, Issuer, Service string
	keys                   []jwt.VerificationKey
}

// tokenLeeway is the clock skew allowed on a token's times.
const tokenLeeway = time.Minute

// NewTokenAuth returns the checker of tokens issued by issuer for service,
// signed by a key of certFile: PEM certificates (their public keys) or
// public keys.
func NewTokenAuth(realm, issuer, service, certFile string) (*TokenAuth, error) {
	if realm == "" || issuer == "" || service == "" || certFile == "" {
		return nil, errors.New("token auth needs --token-realm, --token-issuer, --token-service and --token-cert")
	}
	b, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("token cert: %w", err)
	}
	t := &TokenAuth{Realm: realm, Issuer: issuer, Service: service}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		switch blk.Type {
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return nil, fmt.Errorf("token cert %s: %w", certFile, err)
			}
			t.keys = append(t.keys, c.PublicKey)
		case "PUBLIC KEY":
			k, err := x509.ParsePKIXPublicKey(blk.Bytes)
			if err != nil {
				return nil, fmt.Errorf("token cert %s: %w", certFile, err)
			}
			t.keys = append(t.keys, k)
		}
	}
	if len(t.keys) == 0 {
		return nil, fmt.Errorf("token cert %s: no certificate or public key (PEM)", certFile)
	}
	return t, nil
}

// tokenClaims are a registry token's claims.
type tokenClaims struct {
	jwt.RegisteredClaims
	Access []struct {
		Type    string   `json:"type"`
		Name    string   `json:"name"`
		Actions []string `json:"actions"`
	} `json:"access"`
}

// verify checks token raw (signature by one of the keys, issuer,
// audience, expiry and not-before, with a minute of leeway) and returns
// what it grants.
func (t *TokenAuth) verify(raw string) (Grants, error) {
	var c tokenClaims
	_, err := jwt.ParseWithClaims(raw, &c,
		func(*jwt.Token) (any, error) { return jwt.VerificationKeySet{Keys: t.keys}, nil },
		jwt.WithValidMethods([]string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}),
		jwt.WithIssuer(t.Issuer), jwt.WithAudience(t.Service), jwt.WithExpirationRequired(), jwt.WithLeeway(tokenLeeway))
	if err != nil {
		return nil, err
	}
	var gs Grants
	for _, a := range c.Access {
		switch {
		case a.Type == "repository" && a.Name != "":
			// An exact name: a token is for the scopes asked, not
			// patterns.
			gs = append(gs, Grant{Pattern: escapeMatch(a.Name), Actions: a.Actions})
		case a.Type == "registry" && a.Name == "catalog" && slices.Contains(a.Actions, "*"):
			gs = append(gs, Grant{Catalog: true})
		}
	}
	return gs, nil
}

// escapeMatch quotes the characters path.Match treats specially, so that
// a repository name matches only itself.
func escapeMatch(s string) string {
	return strings.NewReplacer(`\`, `\\`, `*`, `\*`, `?`, `\?`, `[`, `\[`).Replace(s)
}

// challenge is the WWW-Authenticate header sending a client to the token
// server for scope (none for requests of no repository), with an error
// ("invalid_token", "insufficient_scope") when there is one.
func (t *TokenAuth) challenge(scope, errCode string) string {
	h := fmt.Sprintf(`Bearer realm=%q,service=%q`, t.Realm, t.Service)
	if scope != "" {
		h += fmt.Sprintf(`,scope=%q`, scope)
	}
	if errCode != "" {
		h += fmt.Sprintf(`,error=%q`, errCode)
	}
	return h
}
