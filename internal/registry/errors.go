package registry

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/strata-oci/strata/internal/store"
)

// regError is an error as the distribution spec reports it: a code from the
// spec's table, a message, an HTTP status.
type regError struct {
	Status  int
	Code    string
	Message string
	Detail  any
}

func (e *regError) Error() string { return e.Code + ": " + e.Message }

func newErr(status int, code, msg string) *regError {
	return &regError{Status: status, Code: code, Message: msg}
}

// Error codes of the distribution spec.
const (
	codeBlobUnknown         = "BLOB_UNKNOWN"
	codeBlobUploadInvalid   = "BLOB_UPLOAD_INVALID"
	codeBlobUploadUnknown   = "BLOB_UPLOAD_UNKNOWN"
	codeDigestInvalid       = "DIGEST_INVALID"
	codeManifestBlobUnknown = "MANIFEST_BLOB_UNKNOWN"
	codeManifestInvalid     = "MANIFEST_INVALID"
	codeManifestUnknown     = "MANIFEST_UNKNOWN"
	codeNameInvalid         = "NAME_INVALID"
	codeNameUnknown         = "NAME_UNKNOWN"
	codeSizeInvalid         = "SIZE_INVALID"
	codeUnauthorized        = "UNAUTHORIZED"
	codeDenied              = "DENIED"
	codeUnsupported         = "UNSUPPORTED"
	codeRangeInvalid        = "RANGE_INVALID"
	codeTooManyRequests     = "TOOMANYREQUESTS"
	codeUnavailable         = "UNAVAILABLE" // distribution's, for 503
)

// toRegError converts an error from the store (or anywhere below the
// handlers) into the spec's form, once, at the edge.
func toRegError(err error) *regError {
	var re *regError
	switch {
	case errors.As(err, &re):
		return re
	case errors.Is(err, store.ErrBlobUnknown):
		return newErr(http.StatusNotFound, codeBlobUnknown, "blob unknown to registry")
	case errors.Is(err, store.ErrManifestUnknown):
		return newErr(http.StatusNotFound, codeManifestUnknown, "manifest unknown")
	case errors.Is(err, store.ErrUploadUnknown):
		return newErr(http.StatusNotFound, codeBlobUploadUnknown, "blob upload unknown to registry")
	case errors.Is(err, store.ErrNameUnknown):
		return newErr(http.StatusNotFound, codeNameUnknown, "repository name not known to registry")
	case errors.Is(err, store.ErrDigestInvalid):
		return newErr(http.StatusBadRequest, codeDigestInvalid, err.Error())
	case errors.Is(err, store.ErrSizeInvalid):
		return newErr(http.StatusBadRequest, codeSizeInvalid, err.Error())
	case errors.Is(err, store.ErrRangeInvalid):
		return newErr(http.StatusRequestedRangeNotSatisfiable, codeRangeInvalid, err.Error())
	case errors.Is(err, store.ErrUnavailable):
		// The storage (an object store) failed to answer: nothing was
		// stored, the client may try again (writeError: Retry-After).
		return newErr(http.StatusServiceUnavailable, codeUnavailable, "storage unavailable, try again")
	default:
		return newErr(http.StatusInternalServerError, "UNKNOWN", "internal error")
	}
}

type errorBody struct {
	Errors []errorEntry `json:"errors"`
}

type errorEntry struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// retryAfter is what a 503 asks the client to wait, in seconds.
const retryAfter = "5"

func writeError(w http.ResponseWriter, r *http.Request, e *regError) {
	w.Header().Set("Content-Type", "application/json")
	if e.Status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", retryAfter)
	}
	w.WriteHeader(e.Status)
	if r.Method == http.MethodHead {
		return
	}
	json.NewEncoder(w).Encode(errorBody{Errors: []errorEntry{{Code: e.Code, Message: e.Message, Detail: e.Detail}}})
}
