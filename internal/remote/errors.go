package remote

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"unicode"
)

// Sentinels; match them with errors.Is. Errors from a registry's response
// are *Error values, which match the sentinel for their status and code.
var (
	// ErrNotFound: the manifest, blob, repository or platform does not exist.
	ErrNotFound = errors.New("not found")
	// ErrUnauthorized: the registry refused the credentials (or their absence).
	ErrUnauthorized = errors.New("unauthorized")
	// ErrExpansionFailed: the registry cannot expand the layer (422); pull it
	// the ordinary way.
	ErrExpansionFailed = errors.New("layer cannot be expanded")
	// ErrExpanding: the registry was still expanding the layer when the
	// client stopped waiting.
	ErrExpanding = errors.New("layer is still being expanded")
	// ErrDigestMismatch: content does not hash to the digest it was asked by.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrUnsupported: a manifest or media type this client does not handle.
	ErrUnsupported = errors.New("unsupported")
	// ErrInvalidResponse: the registry answered with something malformed.
	ErrInvalidResponse = errors.New("invalid response")
)

// Diagnostic is one entry of the distribution spec's error body
// {"errors": [{"code": …, "message": …, "detail": …}]}.
type Diagnostic struct {
	Code    string          `json:"code"`
	Message string          `json:"message,omitempty"`
	Detail  json.RawMessage `json:"detail,omitempty"`
}

// Error is an unexpected HTTP status from a registry, with the OCI error
// codes and messages of its body.
type Error struct {
	Method     string
	URL        string
	StatusCode int
	// Errors holds the body's diagnostics; empty if the body had none.
	Errors []Diagnostic
	// Body is the start of a body that was not OCI error JSON.
	Body string

	retryAfter string // the Retry-After header, if any
}

// Error reads "GET https://…/manifests/x: 404 MANIFEST_UNKNOWN: manifest unknown".
func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: %d", e.Method, e.URL, e.StatusCode)
	if len(e.Errors) == 0 {
		if t := http.StatusText(e.StatusCode); t != "" {
			b.WriteString(" " + t)
		}
		if e.Body != "" {
			b.WriteString(": " + e.Body)
		}
		return b.String()
	}
	for i, d := range e.Errors {
		if i > 0 {
			b.WriteString(";")
		}
		b.WriteString(" " + d.Code)
		if d.Message != "" {
			b.WriteString(": " + d.Message)
		}
	}
	return b.String()
}

// Code returns the first diagnostic's code, or "".
func (e *Error) Code() string {
	if len(e.Errors) == 0 {
		return ""
	}
	return e.Errors[0].Code
}

// Message returns the diagnostics' messages joined with "; ", or the body.
func (e *Error) Message() string {
	var ms []string
	for _, d := range e.Errors {
		if d.Message != "" {
			ms = append(ms, d.Message)
		}
	}
	if len(ms) == 0 {
		return e.Body
	}
	return strings.Join(ms, "; ")
}

// Temporary reports whether the status is worth retrying.
func (e *Error) Temporary() bool { return retryableStatus(e.StatusCode) }

// Is matches the sentinel for the status and codes.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.StatusCode == http.StatusNotFound
	case ErrUnauthorized:
		return e.StatusCode == http.StatusUnauthorized || e.StatusCode == http.StatusForbidden
	case ErrExpansionFailed:
		return e.StatusCode == http.StatusUnprocessableEntity
	}
	return false
}

func retryableStatus(code int) bool {
	switch code {
	case http.StatusRequestTimeout, http.StatusTooManyRequests:
		return true
	case http.StatusNotImplemented, http.StatusHTTPVersionNotSupported:
		return false
	}
	return code >= 500 && code < 600
}

const maxErrorBody = 64 << 10

// newError builds an *Error from a response, reading (part of) its body.
func newError(resp *http.Response, body []byte) *Error {
	e := &Error{Method: resp.Request.Method, URL: redact(resp.Request.URL.String()), StatusCode: resp.StatusCode,
		retryAfter: resp.Header.Get("Retry-After")}
	var doc struct {
		Errors []Diagnostic `json:"errors"`
	}
	if json.Unmarshal(body, &doc) == nil && len(doc.Errors) > 0 {
		e.Errors = doc.Errors
		return e
	}
	e.Body = snippet(body)
	return e
}

// snippet returns a short, printable start of a non-JSON error body.
func snippet(body []byte) string {
	s := strings.TrimSpace(string(body))
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	for _, r := range s {
		if !unicode.IsPrint(r) && !unicode.IsSpace(r) {
			return ""
		}
	}
	return strings.Join(strings.Fields(s), " ")
}

// redact drops a URL's query, which may carry signed-URL secrets after a
// redirect to blob storage.
func redact(u string) string {
	if i := strings.IndexByte(u, '?'); i >= 0 {
		return u[:i]
	}
	return u
}
