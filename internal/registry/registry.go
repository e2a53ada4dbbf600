// Package registry serves the OCI Distribution API (v1.1) over a store.
package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/store"
)

// Options configure a registry handler.
type Options struct {
	// Logger receives request logs; nil discards them.
	Logger *slog.Logger
	// OnManifest, if set, is called after a manifest is stored (the layer
	// expander queues work from it). It must not block.
	OnManifest func(ctx context.Context, repo string, m store.Manifest)
	// Metrics, if set, records request metrics.
	Metrics *Metrics
	// Upstream, if set, makes the registry a read-only pull-through
	// mirror (package mirror): it is asked to fetch what the store lacks
	// before a manifest or blob is read, and every write to the
	// distribution API is refused.
	Upstream Upstream
	// MaxBlobSize bounds the size of a pushed blob: 0 means
	// DefaultMaxBlobSize, negative no limit. Larger pushes get 413.
	MaxBlobSize int64
	// MaxUploadsPerClient bounds the upload sessions one client (by
	// address) may hold open: 0 means DefaultMaxUploadsPerClient,
	// negative no limit. More get 429.
	MaxUploadsPerClient int
	// RequestTimeout bounds the reading and the answer of requests that
	// do not stream blobs (manifests, tags, the catalog, referrers): 0
	// means DefaultRequestTimeout, negative none.
	RequestTimeout time.Duration
}

// DefaultRequestTimeout is the default of Options.RequestTimeout.
const DefaultRequestTimeout = time.Minute

// Upstream is the registry a mirror serves (package mirror).
type Upstream interface {
	// Manifest makes sure the store can answer manifest ref (a tag or
	// digest) of repo; store.ErrManifestUnknown when the upstream has none.
	Manifest(ctx context.Context, repo, ref string) error
	// Blob makes sure the store holds blob d of repo;
	// store.ErrBlobUnknown when the upstream has none.
	Blob(ctx context.Context, repo string, d digest.Digest) error
}

// Registry is an http.Handler for the distribution API.
type Registry struct {
	store *store.Store
	opts  Options
	log   *slog.Logger
	ext   map[string]http.Handler

	sessions sessions
}

// New returns a registry serving s.
func New(s *store.Store, opts Options) *Registry {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Registry{store: s, opts: opts, log: log, ext: map[string]http.Handler{}}
}

// Extension routes paths /v2/<name>/_<ext>/... and /v2/_<ext>/... to h. The
// handler reads the repository name with RepoFromContext.
func (reg *Registry) Extension(ext string, h http.Handler) { reg.ext[ext] = h }

// HasExtension reports whether extension ext is served.
func (reg *Registry) HasExtension(ext string) bool { _, ok := reg.ext[ext]; return ok }

type ctxKey int

const (
	keyRepo ctxKey = iota
	keyRest
)

// RepoFromContext returns the repository name and the path after
// "_<ext>/" of an extension request.
func RepoFromContext(ctx context.Context) (repo, rest string) {
	repo, _ = ctx.Value(keyRepo).(string)
	rest, _ = ctx.Value(keyRest).(string)
	return repo, rest
}

// Repository names, tags and references as the spec defines them.
var (
	nameComponent = `[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*`
	nameRE        = regexp.MustCompile(`^` + nameComponent + `(?:/` + nameComponent + `)*$`)
	tagRE         = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
)

// maxNameLength bounds a repository name, as distribution does.
const maxNameLength = 255

// validName reports whether name is a repository name the registry takes.
func validName(name string) bool {
	return name != "" && len(name) <= maxNameLength && nameRE.MatchString(name)
}

// route is a parsed /v2/ request path.
type route struct {
	kind string // base, catalog, tags, manifest, blob, upload, referrers, ext
	repo string
	ref  string // manifest reference, blob digest, upload id, referrers subject
	ext  string
	rest string
}

func parseRoute(p string) (route, bool) {
	if p == "/v2/" || p == "/v2" {
		return route{kind: "base"}, true
	}
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return route{}, false
	}
	if rest == "_catalog" {
		return route{kind: "catalog"}, true
	}
	if strings.HasPrefix(rest, "_") {
		ext, tail, _ := strings.Cut(rest[1:], "/")
		return route{kind: "ext", ext: ext, rest: tail}, true
	}
	if name, ok := strings.CutSuffix(rest, "/tags/list"); ok && name != "" {
		return route{kind: "tags", repo: name}, true
	}
	if i := strings.LastIndex(rest, "/blobs/uploads"); i > 0 {
		tail := rest[i+len("/blobs/uploads"):]
		if tail == "" || tail == "/" {
			return route{kind: "upload", repo: rest[:i]}, true
		}
		if id, ok := strings.CutPrefix(tail, "/"); ok && !strings.Contains(id, "/") {
			return route{kind: "upload", repo: rest[:i], ref: id}, true
		}
	}
	for _, k := range []string{"manifests", "blobs", "referrers"} {
		if i := strings.LastIndex(rest, "/"+k+"/"); i > 0 {
			ref := rest[i+len(k)+2:]
			if ref != "" && !strings.Contains(ref, "/") {
				kind := map[string]string{"manifests": "manifest", "blobs": "blob", "referrers": "referrers"}[k]
				return route{kind: kind, repo: rest[:i], ref: ref}, true
			}
		}
	}
	// /v2/<name>/_<ext>/<rest>
	if i := strings.Index(rest, "/_"); i > 0 {
		ext, tail, _ := strings.Cut(rest[i+2:], "/")
		return route{kind: "ext", repo: rest[:i], ext: ext, rest: tail}, true
	}
	return route{}, false
}

func (reg *Registry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	rt, ok := parseRoute(r.URL.Path)
	if !ok {
		writeError(w, r, newErr(http.StatusNotFound, "NOT_FOUND", "no such endpoint"))
		return
	}
	if rt.repo != "" && !validName(rt.repo) {
		writeError(w, r, newErr(http.StatusBadRequest, codeNameInvalid, fmt.Sprintf("invalid repository name %q", rt.repo)))
		return
	}
	switch rt.kind {
	case "base", "catalog", "tags", "manifest", "referrers":
		// Small requests: a client sending or reading them slowly
		// cannot hold the connection (blobs stream as long as they
		// need; idle connections are closed by the server).
		if t := reg.requestTimeout(); t > 0 {
			rc := http.NewResponseController(w)
			rc.SetReadDeadline(time.Now().Add(t))
			rc.SetWriteDeadline(time.Now().Add(t))
		}
	}
	var err error
	if reg.opts.Upstream != nil && r.Method != "GET" && r.Method != "HEAD" && rt.kind != "ext" {
		rt.kind, err = "", newErr(http.StatusMethodNotAllowed, "UNSUPPORTED", "this registry is a read-only mirror")
	}
	switch rt.kind {
	case "base":
		err = methods(r, "GET", "HEAD")
		if err == nil {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			if r.Method == http.MethodGet {
				io.WriteString(w, "{}")
			}
		}
	case "catalog":
		if err = methods(r, "GET"); err == nil {
			err = reg.catalog(w, r)
		}
	case "tags":
		if err = methods(r, "GET"); err == nil {
			err = reg.tags(w, r, rt.repo)
		}
	case "manifest":
		switch r.Method {
		case "GET", "HEAD":
			err = reg.getManifest(w, r, rt.repo, rt.ref)
		case "PUT":
			err = reg.putManifest(w, r, rt.repo, rt.ref)
		case "DELETE":
			err = reg.deleteManifest(w, r, rt.repo, rt.ref)
		default:
			err = errMethod
		}
	case "blob":
		switch r.Method {
		case "GET", "HEAD":
			err = reg.getBlob(w, r, rt.repo, rt.ref)
		case "DELETE":
			err = reg.deleteBlob(w, r, rt.repo, rt.ref)
		default:
			err = errMethod
		}
	case "upload":
		err = reg.upload(w, r, rt.repo, rt.ref)
	case "referrers":
		if err = methods(r, "GET"); err == nil {
			err = reg.referrers(w, r, rt.repo, rt.ref)
		}
	case "ext":
		h, ok := reg.ext[rt.ext]
		if !ok {
			err = newErr(http.StatusNotFound, "NOT_FOUND", "no such extension")
			break
		}
		ctx := context.WithValue(context.WithValue(r.Context(), keyRepo, rt.repo), keyRest, rt.rest)
		h.ServeHTTP(w, r.WithContext(ctx))
	}
	if err != nil {
		re := toRegError(err)
		if re.Status >= 500 {
			reg.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		}
		writeError(w, r, re)
	}
}

var errMethod = newErr(http.StatusMethodNotAllowed, codeUnsupported, "method not allowed")

func methods(r *http.Request, ms ...string) error {
	for _, m := range ms {
		if r.Method == m {
			return nil
		}
	}
	return errMethod
}

func parseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", newErr(http.StatusBadRequest, codeDigestInvalid, fmt.Sprintf("invalid digest %q: %v", s, err))
	}
	return d, nil
}

// ---- pagination ----

// page applies the n and last query parameters to a sorted list and sets the
// Link header for the next page. n is clamped to max.
func page(w http.ResponseWriter, r *http.Request, items []string, max int) ([]string, error) {
	q := r.URL.Query()
	if last := q.Get("last"); last != "" {
		i := sort.SearchStrings(items, last)
		if i < len(items) && items[i] == last {
			i++
		}
		items = items[i:]
	}
	n := max
	if ns := q.Get("n"); ns != "" {
		v, err := strconv.Atoi(ns)
		if err != nil || v < 0 {
			return nil, newErr(http.StatusBadRequest, "PAGINATION_NUMBER_INVALID", fmt.Sprintf("invalid n %q", ns))
		}
		n = min(v, max)
	}
	if n == 0 {
		// An empty page, and no Link: one to the same empty page would
		// send a client that follows Links round for ever.
		return items[:0], nil
	}
	if len(items) > n {
		items = items[:n]
		next := url.Values{}
		next.Set("n", strconv.Itoa(n))
		next.Set("last", items[len(items)-1])
		w.Header().Set("Link", fmt.Sprintf("<%s?%s>; rel=\"next\"", r.URL.Path, next.Encode()))
	}
	return items, nil
}

const maxPage = 1000

func (reg *Registry) catalog(w http.ResponseWriter, r *http.Request) error {
	repos, err := reg.store.Repositories(r.Context())
	if err != nil {
		return err
	}
	repos, err = page(w, r, repos, maxPage)
	if err != nil {
		return err
	}
	return writeJSON(w, "application/json", struct {
		Repositories []string `json:"repositories"`
	}{repos})
}

func (reg *Registry) tags(w http.ResponseWriter, r *http.Request, repo string) error {
	tags, err := reg.store.Tags(r.Context(), repo)
	if err != nil {
		return err
	}
	tags, err = page(w, r, tags, maxPage)
	if err != nil {
		return err
	}
	return writeJSON(w, "application/json", struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{repo, tags})
}

func writeJSON(w http.ResponseWriter, contentType string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, err = w.Write(b)
	if err != nil {
		return nil // the client went away; nothing to report to it
	}
	return nil
}

// ---- manifests ----

func (reg *Registry) resolve(ctx context.Context, repo, ref string) (digest.Digest, error) {
	if strings.Contains(ref, ":") {
		d, err := digest.Parse(ref)
		if err != nil {
			return "", newErr(http.StatusBadRequest, codeDigestInvalid, fmt.Sprintf("invalid digest %q", ref))
		}
		return d, nil
	}
	if !tagRE.MatchString(ref) {
		return "", newErr(http.StatusBadRequest, codeManifestInvalid, fmt.Sprintf("invalid tag %q", ref))
	}
	return reg.store.Resolve(ctx, repo, ref)
}

func (reg *Registry) getManifest(w http.ResponseWriter, r *http.Request, repo, ref string) error {
	if err := reg.fromUpstream(reg.opts.Upstream != nil, func() error { return reg.opts.Upstream.Manifest(r.Context(), repo, ref) }); err != nil {
		return err
	}
	d, err := reg.resolve(r.Context(), repo, ref)
	if err != nil {
		return err
	}
	m, err := reg.store.GetManifest(r.Context(), repo, d)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", m.MediaType)
	h.Set("Content-Length", strconv.Itoa(len(m.Content)))
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(m.Content)
	}
	return nil
}

func (reg *Registry) putManifest(w http.ResponseWriter, r *http.Request, repo, ref string) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxManifestSize+1))
	if err != nil {
		return newErr(http.StatusBadRequest, codeManifestInvalid, "reading manifest: "+err.Error())
	}
	if len(body) > maxManifestSize {
		return newErr(http.StatusRequestEntityTooLarge, codeSizeInvalid, fmt.Sprintf("manifest is larger than %d bytes", maxManifestSize))
	}
	ct := r.Header.Get("Content-Type")
	if i := strings.IndexByte(ct, ';'); i >= 0 {
		ct = strings.TrimSpace(ct[:i])
	}
	mt, meta, err := parseManifest(ct, body)
	if err != nil {
		return err
	}
	var d digest.Digest
	var tags []string
	if strings.Contains(ref, ":") {
		d, err = digest.Parse(ref)
		if err != nil {
			return newErr(http.StatusBadRequest, codeDigestInvalid, fmt.Sprintf("invalid digest %q", ref))
		}
		if !d.Algorithm().Available() {
			return newErr(http.StatusBadRequest, codeDigestInvalid, fmt.Sprintf("unsupported digest algorithm %q", d.Algorithm()))
		}
		if got := d.Algorithm().FromBytes(body); got != d {
			return newErr(http.StatusBadRequest, codeDigestInvalid, fmt.Sprintf("manifest digest is %s, not %s", got, d))
		}
	} else {
		if !tagRE.MatchString(ref) {
			return newErr(http.StatusBadRequest, codeManifestInvalid, fmt.Sprintf("invalid tag %q", ref))
		}
		d = digest.Canonical.FromBytes(body)
		tags = append(tags, ref)
	}
	var paramTags []string
	for _, t := range r.URL.Query()["tag"] {
		if !tagRE.MatchString(t) {
			return newErr(http.StatusBadRequest, codeManifestInvalid, fmt.Sprintf("invalid tag %q", t))
		}
		paramTags = append(paramTags, t)
	}
	tags = append(tags, paramTags...)
	if err := reg.checkReferences(repo, body); err != nil {
		return err
	}
	m := store.Manifest{Digest: d, MediaType: mt, Content: body, Subject: meta.Subject}
	if err := reg.store.PutManifest(r.Context(), repo, m, meta, tags); err != nil {
		return err
	}
	reg.log.Info("manifest stored", "repo", repo, "digest", d, "mediaType", mt, "tags", tags)
	if reg.opts.OnManifest != nil {
		reg.opts.OnManifest(context.WithoutCancel(r.Context()), repo, m)
	}
	h := w.Header()
	h.Set("Location", "/v2/"+repo+"/manifests/"+d.String())
	h.Set("Docker-Content-Digest", d.String())
	if meta.Subject != "" {
		h.Set("OCI-Subject", meta.Subject.String())
	}
	if len(paramTags) > 0 {
		h.Set("OCI-Tag", strings.Join(paramTags, ", "))
	}
	w.WriteHeader(http.StatusCreated)
	return nil
}

func (reg *Registry) deleteManifest(w http.ResponseWriter, r *http.Request, repo, ref string) error {
	if strings.Contains(ref, ":") {
		d, err := parseDigest(ref)
		if err != nil {
			return err
		}
		if err := reg.store.DeleteManifest(r.Context(), repo, d); err != nil {
			return err
		}
	} else {
		if !tagRE.MatchString(ref) {
			return newErr(http.StatusBadRequest, codeManifestInvalid, fmt.Sprintf("invalid tag %q", ref))
		}
		if err := reg.store.Untag(r.Context(), repo, ref); err != nil {
			return err
		}
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// ---- referrers ----

func (reg *Registry) referrers(w http.ResponseWriter, r *http.Request, repo, ref string) error {
	d, err := parseDigest(ref)
	if err != nil {
		return err
	}
	descs, err := reg.store.Referrers(r.Context(), repo, d)
	if err != nil {
		return err
	}
	if at := r.URL.Query().Get("artifactType"); at != "" {
		kept := descs[:0]
		for _, desc := range descs {
			if desc.ArtifactType == at {
				kept = append(kept, desc)
			}
		}
		descs = kept
		w.Header().Set("OCI-Filters-Applied", "artifactType")
	}
	if descs == nil {
		descs = []ocispec.Descriptor{}
	}
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: descs}
	idx.SchemaVersion = 2
	return writeJSON(w, ocispec.MediaTypeImageIndex, idx)
}

// fromUpstream runs fetch, a mirror's fetch from its upstream, when on: a
// failure other than the upstream's "unknown" is 503.
func (reg *Registry) fromUpstream(on bool, fetch func() error) error {
	if !on {
		return nil
	}
	err := fetch()
	if err == nil || errors.Is(err, store.ErrManifestUnknown) || errors.Is(err, store.ErrBlobUnknown) {
		return err
	}
	reg.log.Warn("mirror: upstream fetch failed", "err", err)
	return newErr(http.StatusServiceUnavailable, "UNAVAILABLE", "the upstream registry cannot be reached: "+err.Error())
}

// ---- blobs ----

func (reg *Registry) getBlob(w http.ResponseWriter, r *http.Request, repo, ref string) error {
	d, err := parseDigest(ref)
	if err != nil {
		return err
	}
	if err := reg.fromUpstream(reg.opts.Upstream != nil, func() error { return reg.opts.Upstream.Blob(r.Context(), repo, d) }); err != nil {
		return err
	}
	if r.Method == http.MethodGet {
		// A store that can give the blob's own URL (an object store's
		// presigned GET, with --s3-redirect) sends the client there.
		u, err := reg.store.BlobURL(r.Context(), repo, d)
		if err != nil {
			return err
		}
		if u != "" {
			h := w.Header()
			h.Set("Docker-Content-Digest", d.String())
			// The URL expires: the redirect is not for caches to keep
			// (the blob's answer there is, immutable).
			h.Set("Cache-Control", "no-store")
			http.Redirect(w, r, u, http.StatusTemporaryRedirect)
			return nil
		}
	}
	f, err := reg.store.OpenBlob(r.Context(), repo, d)
	if err != nil {
		return err
	}
	defer f.Close()
	if r.Method == http.MethodHead {
		// A pusher asking whether to upload: it may name the blob in
		// a manifest next, so garbage collection must keep it.
		reg.store.Touch(repo, d)
	}
	h := w.Header()
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Cache-Control", "max-age=31536000, immutable")
	// ServeContent handles HEAD, Range (206, 416) and conditional requests.
	http.ServeContent(w, r, "", time.Time{}, f)
	return nil
}

func (reg *Registry) deleteBlob(w http.ResponseWriter, r *http.Request, repo, ref string) error {
	d, err := parseDigest(ref)
	if err != nil {
		return err
	}
	if err := reg.store.DeleteBlob(r.Context(), repo, d); err != nil {
		return err
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// ---- uploads ----

func (reg *Registry) upload(w http.ResponseWriter, r *http.Request, repo, id string) error {
	if id == "" {
		if r.Method != http.MethodPost {
			return errMethod
		}
		return reg.startUpload(w, r, repo)
	}
	switch r.Method {
	case "GET":
		size, err := reg.store.UploadStatus(r.Context(), repo, id)
		if err != nil {
			return err
		}
		uploadHeaders(w, repo, id, size)
		w.WriteHeader(http.StatusNoContent)
		return nil
	case "PATCH":
		start, length, err := contentRange(r)
		if err != nil {
			return err
		}
		have, err := reg.store.UploadStatus(r.Context(), repo, id)
		if err != nil {
			return err
		}
		body, err := reg.limitBody(r, have)
		if err != nil {
			return err
		}
		size, err := reg.store.AppendUpload(r.Context(), repo, id, start, length, body)
		if err != nil {
			if re := toRegError(err); re.Status == http.StatusRequestedRangeNotSatisfiable {
				uploadHeaders(w, repo, id, size)
			}
			return err
		}
		uploadHeaders(w, repo, id, size)
		w.WriteHeader(http.StatusAccepted)
		return nil
	case "PUT":
		d, err := parseDigest(r.URL.Query().Get("digest"))
		if err != nil {
			return err
		}
		start, length, err := contentRange(r)
		if err != nil {
			return err
		}
		if length != 0 {
			have, err := reg.store.UploadStatus(r.Context(), repo, id)
			if err != nil {
				return err
			}
			body, err := reg.limitBody(r, have)
			if err != nil {
				return err
			}
			if _, err := reg.store.AppendUpload(r.Context(), repo, id, start, length, body); err != nil {
				return err
			}
		}
		_, err = reg.store.CommitUpload(r.Context(), repo, id, d)
		if err == nil || !reg.store.UploadExists(id) {
			reg.endUpload(id)
		}
		if err != nil {
			return err
		}
		blobCreated(w, repo, d)
		return nil
	case "DELETE":
		if err := reg.store.CancelUpload(r.Context(), repo, id); err != nil {
			return err
		}
		reg.endUpload(id)
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	return errMethod
}

func (reg *Registry) startUpload(w http.ResponseWriter, r *http.Request, repo string) error {
	q := r.URL.Query()
	if mount := q.Get("mount"); mount != "" {
		d, err := digest.Parse(mount)
		if err == nil {
			// Only from a named repository that holds the blob, and that
			// the client may pull from: a mount by digest alone, or from
			// a repository it cannot read, would let it read any blob.
			from := q.Get("from")
			if validName(from) && mayPull(r.Context(), from) {
				if err := reg.store.MountBlob(r.Context(), repo, from, d); err == nil {
					blobCreated(w, repo, d)
					return nil
				}
			}
		}
		// Not mountable: fall through to an ordinary upload session.
	}
	if ds := q.Get("digest"); ds != "" {
		d, err := parseDigest(ds)
		if err != nil {
			return err
		}
		size := r.ContentLength
		body, err := reg.limitBody(r, 0)
		if err != nil {
			return err
		}
		if err := reg.store.PutBlob(r.Context(), repo, d, size, body); err != nil {
			return err
		}
		blobCreated(w, repo, d)
		return nil
	}
	client := clientOf(r)
	if err := reg.admitUpload(client); err != nil {
		return err
	}
	id, err := reg.store.NewUpload(r.Context(), repo)
	if err != nil {
		return err
	}
	reg.startedUpload(client, id)
	uploadHeaders(w, repo, id, 0)
	w.WriteHeader(http.StatusAccepted)
	return nil
}

func blobCreated(w http.ResponseWriter, repo string, d digest.Digest) {
	w.Header().Set("Location", "/v2/"+repo+"/blobs/"+d.String())
	w.Header().Set("Docker-Content-Digest", d.String())
	w.WriteHeader(http.StatusCreated)
}

func uploadHeaders(w http.ResponseWriter, repo, id string, size int64) {
	h := w.Header()
	h.Set("Location", "/v2/"+repo+"/blobs/uploads/"+id)
	h.Set("Docker-Upload-UUID", id)
	end := size - 1
	if end < 0 {
		end = 0
	}
	h.Set("Range", fmt.Sprintf("0-%d", end))
}

// contentRange parses a chunk's Content-Range ("start-end", inclusive) and
// Content-Length. start is -1 when there is no Content-Range (a streamed
// chunk); length is -1 when unknown.
func contentRange(r *http.Request) (start, length int64, err error) {
	length = r.ContentLength
	cr := r.Header.Get("Content-Range")
	if cr == "" {
		return -1, length, nil
	}
	cr = strings.TrimPrefix(cr, "bytes ")
	a, b, ok := strings.Cut(cr, "-")
	s, err1 := strconv.ParseInt(a, 10, 64)
	e, err2 := strconv.ParseInt(b, 10, 64)
	// The range's end must be an offset past which a byte can follow:
	// "0-9223372036854775807" would be a length that overflows.
	if !ok || err1 != nil || err2 != nil || s < 0 || e < s || e == math.MaxInt64 {
		return 0, 0, newErr(http.StatusRequestedRangeNotSatisfiable, codeBlobUploadInvalid, fmt.Sprintf("invalid Content-Range %q", r.Header.Get("Content-Range")))
	}
	n := e - s + 1
	if length >= 0 && length != n {
		return 0, 0, newErr(http.StatusBadRequest, codeSizeInvalid, fmt.Sprintf("Content-Range %q covers %d bytes, Content-Length is %d", cr, n, length))
	}
	return s, n, nil
}
