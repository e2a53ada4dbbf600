package remote

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestParseChallenges(t *testing.T) {
	tests := []struct {
		in   []string
		want []challenge
	}{
		{[]string{`Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull"`},
			[]challenge{{"bearer", map[string]string{"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/debian:pull"}}}},
		{[]string{`Basic realm="Registry Realm"`}, []challenge{{"basic", map[string]string{"realm": "Registry Realm"}}}},
		{[]string{`basic`}, []challenge{{"basic", map[string]string{}}}},
		{[]string{`Bearer realm=https://x/token, service=x`}, []challenge{{"bearer", map[string]string{"realm": "https://x/token", "service": "x"}}}},
		{[]string{`Bearer realm="a\"b", scope="repository:a:pull,push"`}, []challenge{{"bearer", map[string]string{"realm": `a"b`, "scope": "repository:a:pull,push"}}}},
		{[]string{`Basic realm="r", Bearer realm="t",service="s"`},
			[]challenge{{"basic", map[string]string{"realm": "r"}}, {"bearer", map[string]string{"realm": "t", "service": "s"}}}},
		{[]string{`Basic realm="r"`, `Bearer realm="t"`},
			[]challenge{{"basic", map[string]string{"realm": "r"}}, {"bearer", map[string]string{"realm": "t"}}}},
		{[]string{``}, nil},
	}
	for _, tt := range tests {
		got := parseChallenges(tt.in)
		if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(challenge{})); diff != "" {
			t.Errorf("parseChallenges(%q) (-want +got):\n%s", tt.in, diff)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"0":                             0,
		"3":                             3 * time.Second,
		"-1":                            0,
		"soon":                          0,
		"Thu, 02 Jan 2025 03:04:15 GMT": 10 * time.Second,
		"Thu, 02 Jan 2025 03:00:00 GMT": 0,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestBackoff(t *testing.T) {
	c := New(Options{Retry: RetryPolicy{MinBackoff: 100 * time.Millisecond, MaxBackoff: 2 * time.Second}})
	tests := []struct {
		attempt  int
		asked    time.Duration
		min, max time.Duration
	}{
		{1, 0, 100 * time.Millisecond, 100 * time.Millisecond},
		{2, 0, 100 * time.Millisecond, 200 * time.Millisecond},
		{3, 0, 200 * time.Millisecond, 400 * time.Millisecond},
		{10, 0, time.Second, 2 * time.Second},
		{100, 0, time.Second, 2 * time.Second},
		{1, time.Second, time.Second, time.Second},                                  // Retry-After honoured
		{1, time.Minute, 2 * time.Second, 2 * time.Second},                          // within MaxBackoff
		{5, 10 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond}, // never below the schedule
	}
	for _, tt := range tests {
		for range 50 {
			if got := c.backoff(tt.attempt, tt.asked); got < tt.min || got > tt.max {
				t.Fatalf("backoff(%d, %s) = %s, want in [%s, %s]", tt.attempt, tt.asked, got, tt.min, tt.max)
			}
		}
	}
}

func TestTransient(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{&Error{StatusCode: 503}, true},
		{&Error{StatusCode: 429}, true},
		{&Error{StatusCode: 408}, true},
		{&Error{StatusCode: 502}, true},
		{&Error{StatusCode: 501}, false},
		{&Error{StatusCode: 404}, false},
		{&Error{StatusCode: 401}, false},
		{fmt.Errorf("get: %w", &Error{StatusCode: 500}), true},
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), true},
		{fmt.Errorf("read: %w", syscall.ECONNRESET), true},
		{io.ErrUnexpectedEOF, true},
		{errAttemptTimeout{time.Second}, true},
		{&net.DNSError{Err: "no such host", Name: "x", IsNotFound: true}, false},
		{&net.DNSError{Err: "server misbehaving", Name: "x", IsTemporary: true}, true},
		{fmt.Errorf("tls: %w", x509.UnknownAuthorityError{}), false},
		{fmt.Errorf("x: %w", ErrDigestMismatch), false},
		{fmt.Errorf("x: %w", ErrInvalidResponse), false},
		{context.Canceled, false},
	}
	for _, tt := range tests {
		if got := transient(tt.err); got != tt.want {
			t.Errorf("transient(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestErrorMatching(t *testing.T) {
	tests := []struct {
		status int
		is     error
	}{
		{404, ErrNotFound},
		{401, ErrUnauthorized},
		{403, ErrUnauthorized},
		{422, ErrExpansionFailed},
	}
	for _, tt := range tests {
		err := fmt.Errorf("wrapped: %w", &Error{StatusCode: tt.status})
		if !errors.Is(err, tt.is) {
			t.Errorf("status %d is not %v", tt.status, tt.is)
		}
		for _, other := range []error{ErrNotFound, ErrUnauthorized, ErrExpansionFailed} {
			if other != tt.is && errors.Is(err, other) {
				t.Errorf("status %d is also %v", tt.status, other)
			}
		}
	}
	e := &Error{Method: "GET", URL: "https://r/v2/x/manifests/y", StatusCode: 404,
		Errors: []Diagnostic{{Code: "MANIFEST_UNKNOWN", Message: "manifest unknown"}, {Code: "NAME_UNKNOWN"}}}
	if got, want := e.Error(), "GET https://r/v2/x/manifests/y: 404 MANIFEST_UNKNOWN: manifest unknown; NAME_UNKNOWN"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if e.Code() != "MANIFEST_UNKNOWN" || e.Message() != "manifest unknown" {
		t.Errorf("Code, Message = %q, %q", e.Code(), e.Message())
	}
}

func TestParseContentRange(t *testing.T) {
	tests := []struct {
		in               string
		start, end, size int64
		ok               bool
	}{
		{"bytes 0-9/100", 0, 9, 100, true},
		{"bytes 10-14/*", 10, 14, -1, true},
		{"bytes 10-14/14", 0, 0, 0, false},
		{"bytes 14-10/100", 0, 0, 0, false},
		{"bytes */100", 0, 0, 0, false},
		{"items 0-9/100", 0, 0, 0, false},
		{"", 0, 0, 0, false},
	}
	for _, tt := range tests {
		s, e, n, err := parseContentRange(tt.in)
		if tt.ok != (err == nil) || (tt.ok && (s != tt.start || e != tt.end || n != tt.size)) {
			t.Errorf("parseContentRange(%q) = %d, %d, %d, %v", tt.in, s, e, n, err)
		}
	}
}

func TestManifestMediaType(t *testing.T) {
	tests := []struct {
		ctype, body string
		want        string // "" for an error
	}{
		{"", `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{}}`, ocispec.MediaTypeImageManifest},
		{MediaTypeDockerManifestList + "; charset=utf-8", `{"schemaVersion":2,"manifests":[]}`, MediaTypeDockerManifestList},
		{"application/json", `{"schemaVersion":2,"manifests":[]}`, ocispec.MediaTypeImageIndex},
		{"", `{"schemaVersion":2,"config":{},"layers":[]}`, ocispec.MediaTypeImageManifest},
		{mediaTypeDockerSchema1JWS, `{"schemaVersion":1,"fsLayers":[]}`, ""},
		{"", `{"schemaVersion":2}`, ""},
		{"", `not json`, ""},
	}
	for _, tt := range tests {
		got, err := manifestMediaType(tt.ctype, []byte(tt.body))
		if tt.want == "" {
			if err == nil {
				t.Errorf("manifestMediaType(%q, %s) = %q, want error", tt.ctype, tt.body, got)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("manifestMediaType(%q, %s) = %q, %v; want %q", tt.ctype, tt.body, got, err, tt.want)
		}
	}
}

func TestSelectPlatform(t *testing.T) {
	p := func(os, arch, variant string) *ocispec.Platform {
		return &ocispec.Platform{OS: os, Architecture: arch, Variant: variant}
	}
	descs := func(ps ...*ocispec.Platform) []ocispec.Descriptor {
		var ds []ocispec.Descriptor
		for i, pl := range ps {
			ds = append(ds, ocispec.Descriptor{Digest: digest.Digest("sha256:" + fmt.Sprint(i)), Platform: pl})
		}
		return ds
	}
	tests := []struct {
		name  string
		descs []ocispec.Descriptor
		want  ocispec.Platform
		index int // -1: no match
	}{
		{"exact", descs(p("linux", "arm64", "v8"), p("linux", "amd64", "")), *p("linux", "amd64", ""), 1},
		{"arm64 variant implied", descs(p("linux", "arm64", "")), *p("linux", "arm64", "v8"), 0},
		{"arm64 wanted without variant", descs(p("linux", "arm64", "v8")), *p("linux", "arm64", ""), 0},
		{"aliases", descs(p("Linux", "x86_64", "")), *p("linux", "amd64", ""), 0},
		{"aarch64", descs(p("linux", "aarch64", "")), *p("linux", "arm64", "v8"), 0},
		{"arm v7 runs v6 and v5, prefers v7", descs(p("linux", "arm", "v5"), p("linux", "arm", "v7"), p("linux", "arm", "v6")), *p("linux", "arm", "v7"), 1},
		{"arm v7 runs v6 when there is no v7", descs(p("linux", "arm", "v5"), p("linux", "arm", "v6")), *p("linux", "arm", "v7"), 1},
		{"arm v6 cannot run v7", descs(p("linux", "arm", "v7")), *p("linux", "arm", "v6"), -1},
		{"amd64 host skips v3 builds", descs(p("linux", "amd64", "v3"), p("linux", "amd64", "")), *p("linux", "amd64", ""), 1},
		{"amd64 v3 host takes v3", descs(p("linux", "amd64", ""), p("linux", "amd64", "v3")), *p("linux", "amd64", "v3"), 1},
		{"other OS", descs(p("windows", "amd64", "")), *p("linux", "amd64", ""), -1},
		{"attestations and missing platforms skipped", descs(nil, p("unknown", "unknown", ""), p("linux", "amd64", "")), *p("linux", "amd64", ""), 2},
		{"empty", nil, *p("linux", "amd64", ""), -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := SelectPlatform(tt.descs, tt.want)
			if tt.index < 0 {
				if ok {
					t.Fatalf("SelectPlatform chose %v, want no match", got.Platform)
				}
				return
			}
			if !ok || got.Digest != tt.descs[tt.index].Digest {
				t.Fatalf("SelectPlatform = %v %v, want entry %d", got.Digest, ok, tt.index)
			}
		})
	}
}

func TestTokenExpiry(t *testing.T) {
	var a authState
	a.setToken("r", "s", token{value: "old", expires: time.Now().Add(-time.Second)})
	if _, ok := a.token("r", "s"); ok {
		t.Error("expired token returned")
	}
	a.setToken("r", "s", token{value: "new", expires: time.Now().Add(time.Minute)})
	if v, ok := a.token("r", "s"); !ok || v != "new" {
		t.Errorf("token = %q, %v", v, ok)
	}
	if _, ok := a.token("r", "other"); ok {
		t.Error("token of another scope returned")
	}
	a.dropToken("r", "s")
	if _, ok := a.token("r", "s"); ok {
		t.Error("dropped token returned")
	}
}

func TestNormalizeAuthKey(t *testing.T) {
	for in, want := range map[string]string{
		"https://index.docker.io/v1/": "docker.io",
		"index.docker.io":             "docker.io",
		"registry-1.docker.io":        "docker.io",
		"docker.io":                   "docker.io",
		"http://localhost:5000":       "localhost:5000",
		"https://ghcr.io/v2/":         "ghcr.io",
		"quay.io":                     "quay.io",
	} {
		if got := normalizeAuthKey(in); got != want {
			t.Errorf("normalizeAuthKey(%q) = %q, want %q", in, got, want)
		}
	}
}
