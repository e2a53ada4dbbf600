// Package remote is the node's registry client: it resolves image
// references to manifests and configs, asks strata registries for layer
// mounts, and reads blobs whole or by range.
//
// It speaks the OCI distribution API with anonymous, basic and bearer-token
// authentication (Docker's token flow). Transient failures (network errors,
// timeouts, 429, 5xx) are retried with exponential backoff and jitter; every
// attempt has a deadline and every call a bounded total budget, so a registry
// outage makes calls fail, never hang. All content fetched by digest is
// verified before it is returned.
package remote

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// RetryPolicy bounds how a call retries transient failures. Zero fields take
// the defaults.
type RetryPolicy struct {
	// Attempts is the most attempts a call makes (default 5; 1 disables retries).
	Attempts int
	// MinBackoff is the first delay between attempts (default 200ms); it
	// doubles on every retry, with jitter, up to MaxBackoff (default 5s).
	// A Retry-After header is honoured within the same bounds.
	MinBackoff, MaxBackoff time.Duration
	// MaxElapsed bounds a call's total time, attempts and delays together
	// (default 60s).
	MaxElapsed time.Duration
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.Attempts <= 0 {
		p.Attempts = 5
	}
	if p.MinBackoff <= 0 {
		p.MinBackoff = 200 * time.Millisecond
	}
	if p.MaxBackoff <= 0 {
		p.MaxBackoff = 5 * time.Second
	}
	if p.MaxBackoff < p.MinBackoff {
		p.MaxBackoff = p.MinBackoff
	}
	if p.MaxElapsed <= 0 {
		p.MaxElapsed = 60 * time.Second
	}
	return p
}

// Options configure a Client. The zero value is usable: HTTPS, anonymous,
// default retries and timeouts, no logs.
type Options struct {
	// Hosts says how each registry is reached (plain HTTP or HTTPS). Nil
	// means HTTPS everywhere; PlainHosts(IsLoopback) suits local test
	// registries.
	Hosts *Hosts
	// Credentials returns the credential for a registry; nil is anonymous.
	// It is asked when a registry answers 401 (and for each bearer token);
	// its error fails the request, without retries. DockerCredentials finds
	// credentials as the docker CLI does.
	Credentials CredentialFunc
	// Transport sends the requests; nil is a clone of http.DefaultTransport.
	Transport http.RoundTripper
	// Logger receives debug logs of retries and auth; nil discards them.
	Logger *slog.Logger
	// Retry bounds retries of transient failures.
	Retry RetryPolicy
	// Timeout is the deadline of one attempt (default 30s). For FetchBlob it
	// bounds the wait for the response and then every wait for body bytes.
	Timeout time.Duration
	// RangeTimeout is the deadline of one ReadRange attempt, body included
	// (default 10s).
	RangeTimeout time.Duration
	// MountWait bounds how long Mount waits for a registry that answers
	// 202 (expansion running) before giving up with ErrExpanding (default 2m).
	MountWait time.Duration
	// Platform is the platform Resolve picks from multi-platform indexes;
	// nil is HostPlatform().
	Platform *ocispec.Platform
	// UserAgent is sent with every request (default "strata").
	UserAgent string
}

// Client talks to registries. It is safe for concurrent use; it caches
// bearer tokens per registry and scope.
type Client struct {
	opts      Options
	retry     RetryPolicy
	log       *slog.Logger
	http      *http.Client
	userAgent string
	auth      authState
	pool      *connPool // nil: the caller's Transport
	// singleRange holds the registries that answer a multi-range request
	// with the whole blob (ReadRanges then does not ask them again).
	singleRange sync.Map
	// noReferrersAPI holds the registries that answered the Referrers API
	// with 404 (Referrers then reads the referrers tag alone).
	noReferrersAPI sync.Map
}

// New returns a client.
func New(opts Options) *Client {
	c := &Client{opts: opts, retry: opts.Retry.withDefaults(), log: opts.Logger, userAgent: opts.UserAgent}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.userAgent == "" {
		c.userAgent = "strata"
	}
	if c.opts.Timeout <= 0 {
		c.opts.Timeout = 30 * time.Second
	}
	if c.opts.RangeTimeout <= 0 {
		c.opts.RangeTimeout = 10 * time.Second
	}
	if c.opts.MountWait <= 0 {
		c.opts.MountWait = 2 * time.Minute
	}
	tr := opts.Transport
	if tr == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		// Layer mounts read many ranges of a few blobs concurrently (the
		// layers of an image, a prefetch's streams): keep those
		// connections for the next requests instead of the default 2.
		t.MaxIdleConnsPerHost = 32
		t.MaxConnsPerHost = 32
		c.pool = &connPool{dialer: &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}, conns: map[string][]net.Conn{}}
		t.DialContext = c.pool.dial
		tr = t
	}
	c.http = &http.Client{Transport: tr}
	return c
}

// Hosts returns the resolver the client reaches registries with (nil:
// HTTPS everywhere).
func (c *Client) Hosts() *Hosts { return c.opts.Hosts }

// Credentials returns the client's source of credentials (nil: anonymous).
func (c *Client) Credentials() CredentialFunc { return c.opts.Credentials }

// request is one logical registry call; send turns it into attempts.
type request struct {
	method   string
	registry string // as in references
	path     string // starting with /v2/
	scope    string // token scope; "" for none
	header   http.Header
	accept   []int         // statuses that are success (default 200)
	timeout  time.Duration // per attempt (default Options.Timeout)
	body     []byte        // sent with every attempt
	// read, if set, consumes a successful response inside the attempt, so
	// that failures while reading the body are retried too. Without it the
	// response is returned open, and its body bounds each read by timeout.
	read func(*http.Response) error
	// need is what the request asks of an endpoint; zero derives it from
	// the method and path (see capability).
	need Capabilities

	// endpoint is the host the request is sent to (set by send).
	endpoint Endpoint
}

// capability is what r asks of an endpoint: resolve for a manifest by tag,
// pull for every other read, push for writes.
func (r request) capability() Capabilities {
	if r.need != 0 {
		return r.need
	}
	if r.method != http.MethodGet && r.method != http.MethodHead {
		return CapPush
	}
	p, _, _ := strings.Cut(r.path, "?")
	if i := strings.LastIndex(p, "/manifests/"); i >= 0 && !strings.Contains(p[i+len("/manifests/"):], ":") {
		return CapResolve
	}
	return CapPull
}

// authKey is the name the registry's authentication state and
// credentials are kept under: the registry as in references for its own
// server, a mirror's host for the mirror.
func (r request) authKey() string {
	if r.endpoint.Mirror {
		return r.endpoint.Host
	}
	return r.registry
}

// url is where r goes on its endpoint.
func (r request) url() string {
	ep := r.endpoint
	if ep.Host == "" { // not sent yet: the registry's own server
		ep = Endpoint{Scheme: "https", Host: apiHost(r.registry), Path: "/v2"}
	}
	u := ep.Scheme + "://" + ep.Host + ep.Path + strings.TrimPrefix(r.path, "/v2")
	if ep.Mirror {
		sep := "?"
		if strings.Contains(r.path, "?") {
			sep = "&"
		}
		u += sep + "ns=" + url.QueryEscape(r.registry)
	}
	return u
}

// url is where a request for path goes on registry's first endpoint.
func (c *Client) url(registry, path string) string {
	r := request{method: http.MethodGet, registry: registry, path: path}
	if eps, err := c.opts.Hosts.endpoints(registry, r.capability()); err == nil {
		r.endpoint = eps[0]
	}
	return r.url()
}

// httpClient sends r.
func (c *Client) httpClient(r request) *http.Client {
	if r.endpoint.Client != nil {
		return r.endpoint.Client
	}
	return c.http
}

// errAttemptTimeout is the cause of an attempt's cancellation at its deadline.
type errAttemptTimeout struct{ d time.Duration }

func (e errAttemptTimeout) Error() string   { return fmt.Sprintf("no response within %s", e.d) }
func (e errAttemptTimeout) Timeout() bool   { return true }
func (e errAttemptTimeout) Temporary() bool { return true }

// send performs r with authentication and retries. It returns the response
// if r.read is nil (the caller closes its body), else nil after r.read
// succeeded. A registry with mirrors (hosts.toml) is tried host by host,
// in order, among the hosts capable of r: a host that fails (any error,
// a 404 included: a mirror may not hold what its upstream does) passes
// the request on to the next after fewer retries; the last host's error
// is the answer.
func (c *Client) send(ctx context.Context, r request) (*http.Response, error) {
	eps, err := c.opts.Hosts.endpoints(r.registry, r.capability())
	if err != nil {
		return nil, err
	}
	for i, ep := range eps {
		r.endpoint = ep
		if i == len(eps)-1 {
			return c.sendTo(ctx, r, c.retry)
		}
		policy := c.retry
		policy.Attempts = min(policy.Attempts, 2)
		policy.MaxElapsed = min(policy.MaxElapsed, 10*time.Second)
		resp, err := c.sendTo(ctx, r, policy)
		if err == nil || ctx.Err() != nil {
			return resp, err
		}
		c.log.DebugContext(ctx, "registry host failed, trying the next", "registry", r.registry,
			"host", ep.Host, "next", eps[i+1].Host, "err", err)
	}
	panic("unreachable")
}

// sendTo performs r on r.endpoint with retries as policy allows.
func (c *Client) sendTo(ctx context.Context, r request, policy RetryPolicy) (*http.Response, error) {
	start := time.Now()
	deadline := start.Add(policy.MaxElapsed)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	timeout := r.timeout
	if timeout <= 0 {
		timeout = c.opts.Timeout
	}
	reauthed := false
	var lastErr error
	for attempt := 1; ; attempt++ {
		resp, err := c.attempt(ctx, r, min(timeout, time.Until(deadline)), &reauthed)
		if err == nil {
			return resp, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s: %w", r.method, redact(r.url()), context.Cause(ctx))
		}
		if !transient(err) {
			return nil, err
		}
		if attempt >= policy.Attempts {
			break
		}
		delay := c.backoff(attempt, retryAfter(err))
		if time.Now().Add(delay).After(deadline) {
			break
		}
		c.log.DebugContext(ctx, "retrying registry request", "method", r.method, "url", redact(r.url()),
			"attempt", attempt, "delay", delay, "err", lastErr)
		if err := sleep(ctx, delay); err != nil {
			return nil, fmt.Errorf("%s %s: %w", r.method, redact(r.url()), err)
		}
	}
	return nil, fmt.Errorf("%w (gave up after %s)", lastErr, time.Since(start).Round(time.Millisecond))
}

// attempt is one try of r (plus one repeat after a 401 that taught it how
// to authenticate). Its errors are *Error for HTTP statuses, else transport
// or read errors.
func (c *Client) attempt(ctx context.Context, r request, timeout time.Duration, reauthed *bool) (*http.Response, error) {
	if timeout <= 0 {
		return nil, errAttemptTimeout{0}
	}
	actx, cancel := context.WithCancelCause(ctx)
	timer := time.AfterFunc(timeout, func() { cancel(errAttemptTimeout{timeout}) })
	done := func() { timer.Stop(); cancel(nil) }
	fail := func(err error) (*http.Response, error) {
		if context.Cause(actx) != nil && ctx.Err() == nil {
			if te, ok := context.Cause(actx).(errAttemptTimeout); ok {
				err = fmt.Errorf("%s %s: %w", r.method, redact(r.url()), te)
			}
		}
		done()
		return nil, err
	}

	for {
		resp, err := c.do(actx, r)
		if err != nil {
			return fail(err)
		}
		if resp.StatusCode == http.StatusUnauthorized && !*reauthed {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
			resp.Body.Close()
			*reauthed = true
			ok, err := c.authenticate(actx, r, resp)
			if err != nil {
				return fail(err)
			}
			if !ok {
				return fail(newError(resp, body))
			}
			continue
		}
		if !accepted(resp.StatusCode, r.accept) {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
			resp.Body.Close()
			return fail(newError(resp, body))
		}
		if r.read != nil {
			err := r.read(resp)
			resp.Body.Close()
			if err != nil {
				return fail(err)
			}
			done()
			return nil, nil
		}
		// From here the deadline applies to each read, not to the caller's pace.
		timer.Stop()
		resp.Body = &idleBody{ReadCloser: resp.Body, timer: timer, idle: timeout, done: done, actx: actx}
		return resp, nil
	}
}

// do sends one HTTP request with what is known of the registry's auth.
func (c *Client) do(ctx context.Context, r request) (*http.Response, error) {
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, r.url(), body)
	if err != nil {
		return nil, err
	}
	for k, v := range r.endpoint.Header {
		req.Header[k] = v
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", c.userAgent)
	if err := c.authorize(ctx, req, r); err != nil {
		return nil, err
	}
	resp, err := c.httpClient(r).Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			// A *url.Error reads `Get "https://…": …`; keep its cause behind
			// our own prefix.
			err = ue.Err
		}
		return nil, fmt.Errorf("%s %s: %w", r.method, redact(req.URL.String()), err)
	}
	return resp, nil
}

// authorize adds the Authorization a previous challenge from the registry
// asked for: a cached (or newly fetched) bearer token, or basic credentials.
func (c *Client) authorize(ctx context.Context, req *http.Request, r request) error {
	ch, ok := c.auth.challenge(r.authKey())
	if !ok {
		return nil
	}
	switch ch.scheme {
	case "bearer":
		if t, ok := c.auth.token(r.authKey(), r.scope); ok {
			req.Header.Set("Authorization", "Bearer "+t)
			return nil
		}
		t, err := c.newToken(ctx, r, ch)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+t)
	case "basic":
		cred, ok := c.auth.basicCredential(r.authKey())
		if !ok {
			var err error
			if cred, err = c.credential(ctx, r.authKey()); err != nil {
				return err
			}
			c.auth.setBasicCredential(r.authKey(), cred)
		}
		if cred.Username != "" || cred.Password != "" {
			req.SetBasicAuth(cred.Username, cred.Password)
		}
	}
	return nil
}

// authenticate learns from a 401 how to authenticate to the registry; it
// reports whether repeating the request can help.
func (c *Client) authenticate(ctx context.Context, r request, resp *http.Response) (bool, error) {
	chs := parseChallenges(resp.Header.Values("WWW-Authenticate"))
	var chosen *challenge
	for i := range chs {
		if chs[i].scheme == "bearer" {
			chosen = &chs[i]
			break
		}
		if chs[i].scheme == "basic" && chosen == nil {
			chosen = &chs[i]
		}
	}
	if chosen == nil {
		return false, nil
	}
	c.auth.setChallenge(r.authKey(), *chosen)
	switch chosen.scheme {
	case "bearer":
		c.auth.dropToken(r.authKey(), r.scope)
		c.log.DebugContext(ctx, "registry asks for a bearer token", "registry", r.registry,
			"realm", chosen.params["realm"], "service", chosen.params["service"], "scope", r.scope)
		if _, err := c.newToken(ctx, r, *chosen); err != nil {
			return false, err
		}
		return true, nil
	case "basic":
		cred, err := c.credential(ctx, r.authKey())
		if err != nil {
			return false, err
		}
		c.auth.setBasicCredential(r.authKey(), cred)
		// Without credentials, or with the ones just refused, repeating is futile.
		if cred.Username == "" && cred.Password == "" || resp.Request.Header.Get("Authorization") != "" {
			return false, nil
		}
		return true, nil
	}
	return false, nil
}

func (c *Client) newToken(ctx context.Context, r request, ch challenge) (string, error) {
	cred, err := c.credential(ctx, r.authKey())
	if err != nil {
		return "", err
	}
	t, err := c.fetchToken(ctx, r, ch, cred)
	if err != nil {
		return "", fmt.Errorf("get token for %s: %w", r.authKey(), err)
	}
	c.auth.setToken(r.authKey(), r.scope, t)
	return t.value, nil
}

func (c *Client) credential(ctx context.Context, registry string) (Credential, error) {
	if c.opts.Credentials == nil {
		return Credential{}, nil
	}
	cred, err := c.opts.Credentials(ctx, registry)
	if err != nil {
		return Credential{}, &credentialError{registry: registry, err: err}
	}
	return cred, nil
}

// credentialError is a failure of Options.Credentials (a credential helper
// missing or failing, a malformed config). Asking again at once would fail
// alike: it is not retried.
type credentialError struct {
	registry string
	err      error
}

func (e *credentialError) Error() string {
	if msg := e.err.Error(); strings.Contains(msg, e.registry) {
		return msg // DockerCredentials' errors name the registry
	}
	return "credentials for " + e.registry + ": " + e.err.Error()
}

func (e *credentialError) Unwrap() error { return e.err }

func accepted(code int, ok []int) bool {
	if len(ok) == 0 {
		return code == http.StatusOK
	}
	for _, c := range ok {
		if c == code {
			return true
		}
	}
	return false
}

// transient reports whether err is worth another attempt: network errors,
// timeouts and retryable statuses are; certificate problems, unknown hosts,
// content errors and other statuses are not.
func transient(err error) bool {
	var re *Error
	if errors.As(err, &re) {
		return re.Temporary()
	}
	if errors.Is(err, ErrDigestMismatch) || errors.Is(err, ErrInvalidResponse) || errors.Is(err, ErrUnsupported) {
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	var credErr *credentialError
	if errors.As(err, &credErr) {
		return false
	}
	var (
		certErr    *tls.CertificateVerificationError
		unknownCA  x509.UnknownAuthorityError
		hostErr    x509.HostnameError
		recordErr  tls.RecordHeaderError
		dnsErr     *net.DNSError
		invalidErr x509.CertificateInvalidError
	)
	switch {
	case errors.As(err, &certErr), errors.As(err, &unknownCA), errors.As(err, &hostErr),
		errors.As(err, &recordErr), errors.As(err, &invalidErr):
		return false
	case errors.As(err, &dnsErr):
		return !dnsErr.IsNotFound
	}
	return true
}

// retryAfter returns the delay a 429 or 503 asked for, or 0.
func retryAfter(err error) time.Duration {
	var re *Error
	if !errors.As(err, &re) || re.retryAfter == "" {
		return 0
	}
	return parseRetryAfter(re.retryAfter, time.Now())
}

// parseRetryAfter reads a Retry-After value: seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0
		}
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0)
	}
	return 0
}

// backoff is the delay before attempt+1: exponential from MinBackoff with
// jitter (between half and all of it), at least what the server asked for,
// at most MaxBackoff.
func (c *Client) backoff(attempt int, asked time.Duration) time.Duration {
	d := c.retry.MinBackoff << min(attempt-1, 30)
	if d <= 0 || d > c.retry.MaxBackoff {
		d = c.retry.MaxBackoff
	}
	d = d/2 + rand.N(d/2+1)
	d = max(d, asked)
	return min(max(d, c.retry.MinBackoff), c.retry.MaxBackoff)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-t.C:
		return nil
	}
}

// idleBody is the body of a response returned open: every read must make
// progress within idle, else the attempt's context is cancelled.
type idleBody struct {
	io.ReadCloser
	timer *time.Timer
	idle  time.Duration
	done  func()
	actx  context.Context
}

func (b *idleBody) Read(p []byte) (int, error) {
	b.timer.Reset(b.idle)
	n, err := b.ReadCloser.Read(p)
	b.timer.Stop()
	if err != nil && err != io.EOF {
		if te, ok := context.Cause(b.actx).(errAttemptTimeout); ok {
			err = fmt.Errorf("reading body: %w", errAttemptTimeout{d: te.d})
		}
	}
	return n, err
}

func (b *idleBody) Close() error {
	err := b.ReadCloser.Close()
	b.done()
	return err
}
