package expand

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/store"
	"github.com/strata-oci/strata/layerindex"
)

// RetryAfter is the Retry-After (seconds) of a 202 answer.
const RetryAfter = 1

// MountWait is how long a mount request waits for a running expansion
// before it answers 202.
const MountWait = 3 * time.Second

// RepoFunc extracts the repository and the path after /_strata/ from a
// request routed to the extension (the registry's RepoFromContext).
type RepoFunc func(r *http.Request) (repo, rest string)

// Handler serves the layer-mount extension routes (see package api).
func (s *Service) Handler(route RepoFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		repo, rest := route(r)
		if repo == "" && rest == "info" {
			if r.Method != http.MethodGet && r.Method != http.MethodHead {
				writeErr(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "method not allowed")
				return
			}
			b, _ := json.Marshal(api.Info{Versions: []int{layerindex.Version}})
			w.Header().Set("Content-Type", "application/json")
			w.Write(b)
			return
		}
		if ds, ok := strings.CutPrefix(rest, "profiles/"); ok && repo != "" {
			s.serveProfile(w, r, repo, ds)
			return
		}
		tail, ok := strings.CutPrefix(rest, "layers/")
		ds, ok2 := strings.CutSuffix(tail, "/mount")
		di, ok3 := strings.CutSuffix(tail, "/index")
		if repo == "" || !ok || !ok2 && !ok3 {
			writeErr(w, http.StatusNotFound, "NOT_FOUND", "no such extension route")
			return
		}
		index := ok3
		if index {
			ds = di
		}
		switch {
		case index && r.Method != http.MethodGet && r.Method != http.MethodHead:
			writeErr(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "indexes are read with GET")
			return
		case !index && r.Method != http.MethodPost:
			writeErr(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "layer mounts are requested with POST")
			return
		}
		d, err := digest.Parse(ds)
		if err != nil {
			writeErr(w, http.StatusBadRequest, "DIGEST_INVALID", "invalid layer digest "+strconv.Quote(ds))
			return
		}
		md, err := s.MountWait(r.Context(), repo, d, MountWait)
		switch {
		case err == nil && index:
			s.serveIndex(w, r, repo, md)
		case err == nil:
			b, _ := json.Marshal(md)
			w.Header().Set("Content-Type", "application/json")
			w.Write(b)
		case errors.Is(err, ErrPending) || errors.Is(err, store.ErrBlobUnknown) && s.opts.Fetching != nil && s.opts.Fetching(repo, d):
			w.Header().Set("Retry-After", strconv.Itoa(RetryAfter))
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusAccepted)
			w.Write([]byte("{}"))
		case errors.Is(err, store.ErrBlobUnknown):
			writeErr(w, http.StatusNotFound, "BLOB_UNKNOWN", "layer "+d.String()+" is not in repository "+repo)
		case errors.Is(err, store.ErrDigestInvalid):
			writeErr(w, http.StatusBadRequest, "DIGEST_INVALID", err.Error())
		case errors.Is(err, ErrUnexpandable):
			writeErr(w, http.StatusUnprocessableEntity, api.CodeExpansionFailed, err.Error())
		default:
			s.log.Error("layer mount request failed", "repo", repo, "layer", d, "err", err)
			writeErr(w, http.StatusInternalServerError, "UNKNOWN", "internal error")
		}
	})
}

// serveIndex answers with the index blob of md: compressed with zstd, from
// the copy the expansion keeps, when the request accepts that encoding.
func (s *Service) serveIndex(w http.ResponseWriter, r *http.Request, repo string, md *api.MountDescriptor) {
	h := w.Header()
	h.Set("Content-Type", md.Index.MediaType)
	h.Set("Docker-Content-Digest", md.Index.Digest.String())
	h.Set("Vary", "Accept-Encoding")
	if acceptsZstd(r) {
		if b, err := s.compressedIndex(r.Context(), repo, md.Index.Digest); err == nil {
			h.Set("Content-Encoding", "zstd")
			h.Set("Content-Length", strconv.Itoa(len(b)))
			if r.Method != http.MethodHead {
				w.Write(b)
			}
			return
		} else {
			s.log.Warn("compressed index not served", "index", md.Index.Digest, "err", err)
		}
	}
	f, err := s.st.OpenBlob(r.Context(), repo, md.Index.Digest)
	if err != nil {
		s.log.Error("index blob unreadable", "repo", repo, "index", md.Index.Digest, "err", err)
		writeErr(w, http.StatusInternalServerError, "UNKNOWN", "internal error")
		return
	}
	defer f.Close()
	http.ServeContent(w, r, "", time.Time{}, f)
}

// acceptsZstd reports whether r's Accept-Encoding names zstd (without q=0).
func acceptsZstd(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept-Encoding") {
		for _, part := range strings.Split(v, ",") {
			name, params, _ := strings.Cut(strings.TrimSpace(part), ";")
			if strings.EqualFold(strings.TrimSpace(name), "zstd") {
				return strings.ReplaceAll(params, " ", "") != "q=0"
			}
		}
	}
	return false
}

// serveProfile answers GET, HEAD and PUT of an image's start-up profile.
func (s *Service) serveProfile(w http.ResponseWriter, r *http.Request, repo, ds string) {
	m, err := digest.Parse(ds)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "DIGEST_INVALID", "invalid manifest digest "+strconv.Quote(ds))
		return
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		b, err := s.Profile(r.Context(), repo, m)
		switch {
		case errors.Is(err, ErrNoProfile):
			writeErr(w, http.StatusNotFound, api.CodeProfileUnknown, "no start-up profile for "+repo+"@"+m.String())
			return
		case err != nil:
			s.log.Error("reading a start-up profile", "repo", repo, "manifest", m, "err", err)
			writeErr(w, http.StatusInternalServerError, "UNKNOWN", "internal error")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		if r.Method == http.MethodGet {
			w.Write(b)
		}
	case http.MethodPut:
		var p api.Profile
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, api.MaxProfileBytes))
		if err := dec.Decode(&p); err != nil {
			writeErr(w, http.StatusBadRequest, api.CodeProfileInvalid, "profile: "+err.Error())
			return
		}
		err := s.PutProfile(r.Context(), repo, m, &p)
		switch {
		case err == nil:
			w.Header().Set("Location", api.ProfilePath(repo, m))
			w.WriteHeader(http.StatusCreated)
		case errors.Is(err, store.ErrManifestUnknown):
			writeErr(w, http.StatusNotFound, "MANIFEST_UNKNOWN", "manifest "+m.String()+" is not in repository "+repo)
		case errors.Is(err, ErrBadProfile):
			writeErr(w, http.StatusBadRequest, api.CodeProfileInvalid, err.Error())
		default:
			s.log.Error("storing a start-up profile", "repo", repo, "manifest", m, "err", err)
			writeErr(w, http.StatusInternalServerError, "UNKNOWN", "internal error")
		}
	default:
		writeErr(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "profiles are read with GET and stored with PUT")
	}
}

func writeErr(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
}
