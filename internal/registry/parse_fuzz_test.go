package registry

import (
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/strata-oci/strata/internal/store"
)

// The parsers of the distribution API, each fuzzed alone with oracles on
// what it returns (FuzzHandler, in the external test package, throws
// whole requests at the registry). The seeds run in every `go test`; to
// search, one target at a time:
//
//	go test -run '^$' -fuzz '^FuzzParseRoute$' -fuzztime 60s ./internal/registry/
//
// and likewise FuzzContentRange, FuzzParseManifest and FuzzPage.

// FuzzParseRoute: a parsed route is what the path says, and a repository
// name or tag the registry takes is a relative path of the store that
// stays in its repository's directory and cannot name the store's own
// underscore-prefixed directories.
func FuzzParseRoute(f *testing.F) {
	for _, p := range []string{
		"/v2/", "/v2", "/v2/_catalog", "/v2/_strata/info", "/v2/_strata",
		"/v2/library/debian/tags/list", "/v2/a/blobs/uploads/", "/v2/a/blobs/uploads",
		"/v2/a/blobs/uploads/0123456789abcdef0123456789abcdef", "/v2/a/blobs/uploads/x/y",
		"/v2/a/manifests/latest", "/v2/a/b/blobs/sha256:" + strings.Repeat("a", 64),
		"/v2/a/referrers/sha256:" + strings.Repeat("1", 64), "/v2/a/_strata/layers/sha256:00/mount",
		"/v2/a/../b/manifests/t", "/v2/./manifests/t", "/v2//manifests/t", "/v2/a//b/tags/list",
		"/v2/A/manifests/t", "/v2/a_/manifests/t", "/v2/a/_layers/manifests/t", "/v2/a/manifests/manifests/t",
		"/v2/a/blobs/uploads/manifests/t", "/v2/" + strings.Repeat("a/", 130) + "tags/list",
		"/v2/a\x00b/manifests/t", "/v2/a%2fb/manifests/t", "/v3/a/manifests/t",
	} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p string) {
		rt, ok := parseRoute(p)
		if !ok {
			if rt != (route{}) {
				t.Fatalf("%q: not routed, but %+v", p, rt)
			}
			return
		}
		plural := map[string]string{"manifest": "manifests", "blob": "blobs", "referrers": "referrers"}
		switch rt.kind {
		case "base":
			if p != "/v2/" && p != "/v2" {
				t.Fatalf("%q routed as the base", p)
			}
		case "catalog":
			if p != "/v2/_catalog" {
				t.Fatalf("%q routed as the catalog", p)
			}
		case "tags":
			if p != "/v2/"+rt.repo+"/tags/list" {
				t.Fatalf("%q routed as %+v", p, rt)
			}
		case "manifest", "blob", "referrers":
			if rt.ref == "" || strings.Contains(rt.ref, "/") || p != "/v2/"+rt.repo+"/"+plural[rt.kind]+"/"+rt.ref {
				t.Fatalf("%q routed as %+v", p, rt)
			}
		case "upload":
			if strings.Contains(rt.ref, "/") || !slices.Contains([]string{"", "/", "/" + rt.ref}, strings.TrimPrefix(p, "/v2/"+rt.repo+"/blobs/uploads")) ||
				!strings.HasPrefix(p, "/v2/"+rt.repo+"/blobs/uploads") {
				t.Fatalf("%q routed as %+v", p, rt)
			}
		case "ext":
			prefix := "/v2/_" + rt.ext
			if rt.repo != "" {
				prefix = "/v2/" + rt.repo + "/_" + rt.ext
			}
			if strings.Contains(rt.ext, "/") || !strings.HasPrefix(p, prefix) || (rt.rest != "" && p != prefix+"/"+rt.rest) {
				t.Fatalf("%q routed as %+v", p, rt)
			}
		default:
			t.Fatalf("%q: route kind %q", p, rt.kind)
		}
		if rt.kind != "base" && rt.kind != "catalog" && rt.kind != "ext" && rt.repo == "" {
			// ServeHTTP validates only names that are there.
			t.Fatalf("%q routed as %+v, without a repository", p, rt)
		}
		if rt.repo != "" && validName(rt.repo) {
			checkName(t, rt.repo)
		}
		if tagRE.MatchString(rt.ref) {
			if strings.ContainsAny(rt.ref, `/\:`) || !filepath.IsLocal(rt.ref) || strings.HasPrefix(rt.ref, ".") {
				t.Fatalf("tag %q is not a plain file name", rt.ref)
			}
		}
	})
}

// checkName holds the oracles for a repository name validName takes: it
// becomes the directory repositories/<name>/ of the store (store.repoKey),
// beside _layers, _manifests and _referrers of other repositories.
func checkName(t *testing.T, name string) {
	t.Helper()
	if len(name) > maxNameLength || name != strings.ToLower(name) {
		t.Fatalf("name %q: too long or not lower case", name)
	}
	if path.Clean(name) != name || !filepath.IsLocal(name) || strings.ContainsAny(name, "\\:\x00") {
		t.Fatalf("name %q is not a clean relative path", name)
	}
	for c := range strings.SplitSeq(name, "/") {
		if c == "" || c == "." || c == ".." || !isAlnum(c[0]) || !isAlnum(c[len(c)-1]) {
			t.Fatalf("name %q has component %q", name, c)
		}
	}
	if k := path.Join("repositories", name, "_manifests"); !strings.HasPrefix(k, "repositories/"+name+"/") {
		t.Fatalf("name %q: key %q leaves its directory", name, k)
	}
}

func isAlnum(b byte) bool { return 'a' <= b && b <= 'z' || '0' <= b && b <= '9' }

// FuzzContentRange: a chunk's Content-Range is taken only as a range of
// one byte or more that ends before the largest offset, and agrees with
// the Content-Length if there is one; anything else is a 400 or 416.
func FuzzContentRange(f *testing.F) {
	for _, s := range []struct {
		cr string
		cl int64
	}{
		{"", -1}, {"", 7}, {"0-4", 5}, {"0-4", -1}, {"bytes 5-9", 5}, {"5-1", -1}, {"-1-5", -1},
		{"0-9223372036854775806", -1}, {"1-922337203685477580", -1}, {"+3-+4", 2}, {"3 - 4", 2},
		{"0x1-2", -1}, {"1-2-3", -1}, {"bytes=0-1", 2}, {"bytes 0-1/2", 2}, {"4-4", 0},
	} {
		f.Add(s.cr, s.cl)
	}
	f.Fuzz(func(t *testing.T, cr string, cl int64) {
		if cl < -1 {
			cl = -1 // net/http: -1 is unknown, never less
		}
		r := &http.Request{Header: http.Header{}, ContentLength: cl}
		if cr != "" {
			r.Header.Set("Content-Range", cr)
		}
		start, length, err := contentRange(r)
		if err != nil {
			var re *regError
			if !errors.As(err, &re) || re.Status != http.StatusBadRequest && re.Status != http.StatusRequestedRangeNotSatisfiable {
				t.Fatalf("Content-Range %q, length %d: error %v is not a 400 or 416", cr, cl, err)
			}
			return
		}
		if cr == "" {
			if start != -1 || length != cl {
				t.Fatalf("no Content-Range, length %d: %d, %d", cl, start, length)
			}
			return
		}
		if start < 0 || length < 1 || start > math.MaxInt64-length {
			t.Fatalf("Content-Range %q taken as start %d, length %d", cr, start, length)
		}
		if cl >= 0 && length != cl {
			t.Fatalf("Content-Range %q taken as %d bytes with a Content-Length of %d", cr, length, cl)
		}
	})
}

// FuzzParseManifest: a manifest parseManifest takes is JSON of the media
// type it was pushed as, and what Go's JSON decoding (the registry's own
// store.ParseReferences, a client's) reads of it is one kind of document:
// an index has no config or layers, an image manifest no manifests.
func FuzzParseManifest(f *testing.F) {
	d := "sha256:" + strings.Repeat("a", 64)
	desc := `{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` + d + `","size":2}`
	for _, s := range []struct{ ct, body string }{
		{"application/vnd.oci.image.manifest.v1+json", `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":` + desc + `,"layers":[` + desc + `]}`},
		{"", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":` + desc + `,"layers":[]}`},
		{"application/vnd.oci.image.index.v1+json", `{"schemaVersion":2,"manifests":[` + desc + `],"subject":` + desc + `,"artifactType":"x","annotations":{"a":"b"}}`},
		{"application/vnd.oci.image.index.v1+json", `{"schemaVersion":2,"manifests":[],"layers":[]}`},
		{"", `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"` + d + `","size":1,"data":"e30="},"layers":null}`},
		{"", `{"schemaVersion":2.0,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"mediaType":"x","digest":"sha512:00","size":-1}]}`},
		{"application/json", `{"schemaVersion":2}`},
		// Go decodes keys case-insensitively: "Layers" is layers to it.
		{"application/vnd.oci.image.index.v1+json", `{"schemaVersion":2,"manifests":[],"Layers":[` + desc + `]}`},
		{"", `[]`}, {"", `null`}, {"", `{"schemaVersion":"2"}`}, {"", `{"schemaVersion":2,"schemaVersion":1}`},
	} {
		f.Add(s.ct, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, ct string, body []byte) {
		mt, meta, err := parseManifest(ct, body)
		if err != nil {
			var re *regError
			if !errors.As(err, &re) || re.Status != http.StatusBadRequest || re.Code != codeManifestInvalid {
				t.Fatalf("error %v is not a 400 MANIFEST_INVALID", err)
			}
			return
		}
		if !isManifestType(mt) && !isIndexType(mt) || ct != "" && mt != ct {
			t.Fatalf("taken as %q, pushed as %q", mt, ct)
		}
		if !json.Valid(body) {
			t.Fatalf("%q taken, not valid JSON", body)
		}
		if meta.Subject != "" && meta.Subject.Validate() != nil {
			t.Fatalf("subject %q taken", meta.Subject)
		}
		// What a Go client decodes of it (containerd's check of a
		// pulled manifest against its media type is this one):
		// "layers": null is layers, and keys match in any case.
		var doc struct {
			Config    json.RawMessage `json:"config"`
			Layers    json.RawMessage `json:"layers"`
			Manifests json.RawMessage `json:"manifests"`
		}
		if err := json.Unmarshal(body, &doc); err != nil {
			t.Fatalf("%q taken, does not decode: %v", body, err)
		}
		if isIndexType(mt) && (len(doc.Config) != 0 || len(doc.Layers) != 0) {
			t.Fatalf("index %q taken, it decodes with a config or layers", body)
		}
		if isManifestType(mt) && len(doc.Manifests) != 0 {
			t.Fatalf("image manifest %q taken, it decodes with manifests", body)
		}
		refs := store.ParseReferences(body)
		for _, d := range append(append(refs.Blobs, refs.Manifests...), refs.Foreign...) {
			if d.Validate() != nil {
				t.Fatalf("references of %q name %q", body, d)
			}
		}
	})
}

// FuzzPage: pagination (n, last) of a sorted list answers at most n (and
// at most the page size) items after last, and the Link pages that follow
// answer the rest of the list, each once, in order.
func FuzzPage(f *testing.F) {
	f.Add("a,b,c,d,e", "n=2", 3)
	f.Add("a,b/c,d", "n=2&last=a", 1000)
	f.Add("a,b,c", "last=b", 2)
	f.Add("a,b,c", "n=0", 2)
	f.Add("a,b,c", "n=-1", 2)
	f.Add("a,b,c", "n=99999999999999999999", 2)
	f.Add("a,b,c", "last=zz&n=1", 2)
	f.Add("x%26y,x&y,x y,x+y,\xff", "n=1&last=", 2)
	linkRE := regexp.MustCompile(`^<([^>]*)>; rel="next"$`)
	f.Fuzz(func(t *testing.T, list, query string, max int) {
		max = 1 + (max&0x7fffffff)%8
		// Sorted and unique, never empty: repository names and tags,
		// as the store lists them.
		items := slices.DeleteFunc(strings.Split(list, ","), func(s string) bool { return s == "" })
		slices.Sort(items)
		items = slices.Compact(items)
		target := "/v2/_catalog?" + query
		u, err := url.Parse(target)
		if err != nil {
			return // not a request a server receives
		}
		want := items
		if last := u.Query().Get("last"); last != "" {
			want = slices.DeleteFunc(slices.Clone(items), func(s string) bool { return s <= last })
		}
		var got []string
		for pages := 0; ; pages++ {
			if pages > len(items)+1 {
				t.Fatalf("%q over %q: more than %d pages", query, items, pages)
			}
			r := httptest.NewRequest("GET", "http://registry/", nil)
			if r.URL, err = url.Parse(target); err != nil {
				t.Fatalf("Link target %q: %v", target, err)
			}
			w := httptest.NewRecorder()
			out, err := page(w, r, items, max)
			if err != nil {
				var re *regError
				ns := r.URL.Query().Get("n")
				if v, perr := strconv.Atoi(ns); pages > 0 || !errors.As(err, &re) || re.Status != http.StatusBadRequest || perr == nil && v >= 0 {
					t.Fatalf("%s: error %v", target, err)
				}
				return
			}
			n := max
			if v, err := strconv.Atoi(r.URL.Query().Get("n")); err == nil {
				n = min(v, max)
			}
			if len(out) > n {
				t.Fatalf("%s: %d items, n is %d", target, len(out), n)
			}
			got = append(got, out...)
			link := w.Header().Get("Link")
			if n == 0 {
				if len(out) != 0 || link != "" {
					t.Fatalf("%s: n=0 answered %q, Link %q; want nothing and no Link", target, out, link)
				}
				return
			}
			if link == "" {
				break
			}
			m := linkRE.FindStringSubmatch(link)
			if m == nil {
				t.Fatalf("%s: Link %q", target, link)
			}
			target = m[1]
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%q over %q: pages answer %q, want %q", query, items, got, want)
		}
	})
}

// TestContentRangeOverflow: a chunk whose Content-Range ends at the
// largest offset (found by FuzzContentRange) is refused; its length
// overflowed to a negative number before, which the store takes as a
// chunk of unknown length, and the chunk was stored whatever its size.
func TestContentRangeOverflow(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := New(st, Options{})
	w := httptest.NewRecorder()
	reg.ServeHTTP(w, httptest.NewRequest("POST", "/v2/app/blobs/uploads/", nil))
	if w.Code != http.StatusAccepted {
		t.Fatalf("start upload: %d", w.Code)
	}
	r := httptest.NewRequest("PATCH", w.Header().Get("Location"), strings.NewReader("abc"))
	r.ContentLength = -1 // streamed
	r.Header.Set("Content-Range", "0-9223372036854775807")
	w = httptest.NewRecorder()
	reg.ServeHTTP(w, r)
	if w.Code != http.StatusRequestedRangeNotSatisfiable {
		t.Fatalf("PATCH with Content-Range 0-9223372036854775807: %d %s, want 416", w.Code, w.Body)
	}
}

// TestTagsWithoutName: /v2//tags/list (found by FuzzParseRoute) is no
// route: it listed the tags of the repository named "", whose name
// ServeHTTP does not validate, in the store's repositories/ directory
// itself. (Behind Handler, the ServeMux redirects the path first.)
func TestTagsWithoutName(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	New(st, Options{}).ServeHTTP(w, httptest.NewRequest("GET", "/v2//tags/list", nil))
	if w.Code != http.StatusNotFound {
		t.Fatalf("GET /v2//tags/list: %d %s, want 404", w.Code, w.Body)
	}
}
