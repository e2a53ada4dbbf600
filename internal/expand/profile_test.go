package expand_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/layerindex"
)

// mountedImage pushes an image of files(t) as lib/app:v1 and expands its
// layer: the manifest and layer digests, the mount descriptor and the
// files' content.
func mountedImage(t *testing.T, srv *server) (m, layer digest.Digest, md api.MountDescriptor, content map[string][]byte) {
	t.Helper()
	tr, content := files(t)
	m, descs := pushImage(t, srv.URL, "lib/app", "v1", ocilayout.GzipLayer(tr))
	layer = descs[0].Digest
	code, body := mount(t, srv.URL, "lib/app", layer)
	if code != 200 || json.Unmarshal(body, &md) != nil {
		t.Fatalf("mount: %d %s", code, body)
	}
	return m, layer, md, content
}

func TestProfileAPI(t *testing.T) {
	srv := start(t, t.TempDir())
	defer srv.stop()
	m, layer, md, _ := mountedImage(t, srv)
	url := srv.URL + api.ProfilePath("lib/app", m)

	if code, _, body := req(t, "GET", url, nil); code != http.StatusNotFound || !json.Valid(body) {
		t.Fatalf("GET before any profile: %d %s", code, body)
	}
	good := api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{3, 0, 1}, Ranges: [][2]int64{{30, 10}, {0, 10}, {10, 10}}, Ranks: []int{0, 1, 2}}}}
	put := func(p any, u string) (int, []byte) {
		b, _ := json.Marshal(p)
		code, _, body := req(t, "PUT", u, b, "Content-Type", "application/json")
		return code, body
	}
	for name, tc := range map[string]struct {
		p    any
		want int
	}{
		"not a layer of the image": {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: digest.FromString("x"), Data: md.Data.Digest}}}, 400},
		"another data blob":        {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: digest.FromString("y")}}}, 400},
		"negative frame":           {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{-1}}}}, 400},
		"layer twice":              {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{good.Layers[0], good.Layers[0]}}, 400},
		"format version":           {api.Profile{Version: 99}, 400},
		"ranges for other frames":  {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0, 1}, Ranges: [][2]int64{{0, 10}}}}}, 400},
		"range past the blob":      {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0}, Ranges: [][2]int64{{md.Data.Size - 1, 10}}}}}, 400},
		"ranks for other frames":   {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0, 1}, Ranks: []int{0}}}}, 400},
		"a rank twice":             {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0, 1}, Ranks: []int{0, 0}}}}, 400},
		"ranks not from 0":         {api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0, 1}, Ranks: []int{1, 2}}}}, 400},
		"not JSON":                 {"[", 400},
	} {
		if code, body := put(tc.p, url); code != tc.want {
			t.Errorf("%s: PUT %d %s, want %d", name, code, body, tc.want)
		}
	}
	if code, body := put(good, srv.URL+api.ProfilePath("lib/app", digest.FromString("no such manifest"))); code != 404 {
		t.Errorf("PUT for an unknown manifest: %d %s", code, body)
	}
	if code, body := put(good, srv.URL+api.ProfilePath("other/repo", m)); code != 404 {
		t.Errorf("PUT in a repository without the image: %d %s", code, body)
	}
	if code, body := put(good, url); code != http.StatusCreated {
		t.Fatalf("PUT: %d %s", code, body)
	}
	code, hdr, body := req(t, "GET", url, nil)
	var got api.Profile
	if code != 200 || hdr.Get("Content-Type") != "application/json" || json.Unmarshal(body, &got) != nil {
		t.Fatalf("GET: %d %s", code, body)
	}
	if len(got.Layers) != 1 || len(got.Layers[0].Frames) != 3 || got.Layers[0].Frames[0] != 3 {
		t.Errorf("GET returned %+v", got)
	}
	// Profiles are per repository.
	if code, _, _ := req(t, "GET", srv.URL+api.ProfilePath("other/repo", m), nil); code != 404 {
		t.Errorf("GET in another repository: %d", code)
	}
	if code, _, _ := req(t, "DELETE", url, nil); code != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: %d", code)
	}
	// A profile goes with its image.
	if code, _, body := req(t, "DELETE", srv.URL+"/v2/lib/app/manifests/"+m.String(), nil); code != 202 {
		t.Fatalf("delete manifest: %d %s", code, body)
	}
	if code, _, _ := req(t, "GET", url, nil); code != 404 {
		t.Errorf("GET after the manifest was deleted: %d", code)
	}
}

// TestProfilePack: a profile that lists pages gets a pack of exactly those
// bytes, in first-read order, as zstd chunks with their digests; pages
// outside the stream are refused; a pack in a PUT is the registry's to
// make.
func TestProfilePack(t *testing.T) {
	srv := start(t, t.TempDir())
	defer srv.stop()
	m, layer, md, content := mountedImage(t, srv)
	code, _, raw := req(t, "GET", srv.URL+"/v2/lib/app/blobs/"+md.Index.Digest.String(), nil)
	ix, err := layerindex.Decode(raw)
	if code != 200 || err != nil {
		t.Fatalf("index: %d %v", code, err)
	}
	at := func(p string) int64 {
		i, ok := ix.Lookup(p)
		if !ok {
			t.Fatalf("no %s", p)
		}
		return ix.Entries[i].Offset
	}
	big, hello := at("usr/lib/big"), at("etc/hello")
	url := srv.URL + api.ProfilePath("lib/app", m)
	put := func(p api.Profile) (int, []byte) {
		b, _ := json.Marshal(p)
		code, _, body := req(t, "PUT", url, b, "Content-Type", "application/json")
		return code, body
	}
	profile := func(pages [][2]int64, ranks []int) api.Profile {
		return api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{
			Layer: layer, Data: md.Data.Digest, Frames: []int{0}, Pages: pages, PageRanks: ranks,
		}}}
	}
	for name, p := range map[string]api.Profile{
		"page past the stream":  profile([][2]int64{{ix.StreamSize - 10, 20}}, nil),
		"negative page":         profile([][2]int64{{-1, 20}}, nil),
		"empty page":            profile([][2]int64{{0, 0}}, nil),
		"ranks for other pages": profile([][2]int64{{0, 10}, {20, 10}}, []int{0}),
		"page ranks not from 0": profile([][2]int64{{0, 10}, {20, 10}}, []int{1, 2}),
	} {
		if code, body := put(p); code != 400 {
			t.Errorf("%s: PUT %d %s, want 400", name, code, body)
		}
	}

	p := profile([][2]int64{{big + 300000, 200000}, {big + 10, 5000}, {hello, 6}}, []int{1, 0, 2})
	p.Pack = &api.Pack{Digest: digest.FromString("forged"), Size: 1}
	if code, body := put(p); code != 201 {
		t.Fatalf("PUT: %d %s", code, body)
	}
	code, _, body := req(t, "GET", url, nil)
	var got api.Profile
	if code != 200 || json.Unmarshal(body, &got) != nil || got.Pack == nil {
		t.Fatalf("GET: %d %s", code, body)
	}
	k := got.Pack
	want := slices.Concat(content["usr/lib/big"][10:5010], content["usr/lib/big"][300000:500000], content["etc/hello"])
	code, _, blob := req(t, "GET", srv.URL+"/v2/lib/app/blobs/"+k.Digest.String(), nil)
	if code != 200 || int64(len(blob)) != k.Size || digest.FromBytes(blob) != k.Digest {
		t.Fatalf("pack blob: %d, %d bytes, want %d of %s", code, len(blob), k.Size, k.Digest)
	}
	dec, _ := zstd.NewReader(nil)
	defer dec.Close()
	var unpacked []byte
	for i, c := range k.Chunks {
		cb := blob[:c.Size]
		blob = blob[c.Size:]
		if digest.FromBytes(cb) != c.Digest {
			t.Errorf("chunk %d: digest differs", i)
		}
		b, err := dec.DecodeAll(cb, nil)
		if err != nil || int64(len(b)) != c.USize || c.USize > api.PackChunkSize {
			t.Fatalf("chunk %d: %d bytes (%v), want %d", i, len(b), err, c.USize)
		}
		unpacked = append(unpacked, b...)
	}
	if !bytes.Equal(unpacked, want) || len(k.Chunks) != 2 {
		t.Errorf("pack holds %d bytes in %d chunks, want the %d bytes of the pages in first-read order in 2", len(unpacked), len(k.Chunks), len(want))
	}
	wantSpans := [][3]int64{{0, big + 10, 5000}, {0, big + 300000, 200000}, {0, hello, 6}}
	if !slices.Equal(k.Spans, wantSpans) {
		t.Errorf("spans %v, want %v", k.Spans, wantSpans)
	}
}

// TestProfileReferrer: a stored profile is also published as a profile
// artifact referring to its image (one, replaced with the profile), so
// that a copy of the image with its referrers carries it; in the
// repository it is copied to, the profile route serves it, without a
// pack.
func TestProfileReferrer(t *testing.T) {
	srv := start(t, t.TempDir())
	defer srv.stop()
	m, layer, md, _ := mountedImage(t, srv)
	url := srv.URL + api.ProfilePath("lib/app", m)
	referrers := func(repo string) ocispec.Index {
		t.Helper()
		code, _, body := req(t, "GET", srv.URL+"/v2/"+repo+"/referrers/"+m.String()+"?artifactType="+api.ArtifactTypeProfile, nil)
		var idx ocispec.Index
		if code != 200 || json.Unmarshal(body, &idx) != nil {
			t.Fatalf("referrers: %d %s", code, body)
		}
		return idx
	}
	for _, frames := range [][]int{{0, 1}, {1}} {
		b, _ := json.Marshal(api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: frames}}})
		if code, _, body := req(t, "PUT", url, b, "Content-Type", "application/json"); code != http.StatusCreated {
			t.Fatalf("PUT: %d %s", code, body)
		}
	}
	idx := referrers("lib/app")
	if len(idx.Manifests) != 1 {
		t.Fatalf("%d profile artifacts, want 1 (the replaced one removed)", len(idx.Manifests))
	}

	// Copy the image and the artifact to another repository, as oras cp -r does.
	copyTo := func(repo, ref, mediaType string) {
		t.Helper()
		code, _, body := req(t, "GET", srv.URL+"/v2/lib/app/manifests/"+ref, nil, "Accept", mediaType)
		if code != 200 {
			t.Fatalf("GET manifest %s: %d", ref, code)
		}
		var doc ocispec.Manifest
		json.Unmarshal(body, &doc)
		for _, d := range append([]ocispec.Descriptor{doc.Config}, doc.Layers...) {
			_, _, blob := req(t, "GET", srv.URL+"/v2/lib/app/blobs/"+d.Digest.String(), nil)
			if code, _, b := req(t, "POST", srv.URL+"/v2/"+repo+"/blobs/uploads/?digest="+d.Digest.String(), blob); code != 201 {
				t.Fatalf("copy blob: %d %s", code, b)
			}
		}
		if code, _, b := req(t, "PUT", srv.URL+"/v2/"+repo+"/manifests/"+ref, body, "Content-Type", mediaType); code != 201 {
			t.Fatalf("copy manifest: %d %s", code, b)
		}
	}
	copyTo("copy/app", m.String(), ocispec.MediaTypeImageManifest)
	if code, _, _ := req(t, "GET", srv.URL+api.ProfilePath("copy/app", m), nil); code != 404 {
		t.Fatalf("profile before its artifact was copied: %d", code)
	}
	copyTo("copy/app", idx.Manifests[0].Digest.String(), ocispec.MediaTypeImageManifest)
	code, _, body := req(t, "GET", srv.URL+api.ProfilePath("copy/app", m), nil)
	var got api.Profile
	if code != 200 || json.Unmarshal(body, &got) != nil || len(got.Layers) != 1 || !slices.Equal(got.Layers[0].Frames, []int{1}) || got.Pack != nil {
		t.Errorf("profile from the copied artifact: %d %s", code, body)
	}
}

// TestProfilePackShared: two images of one repository whose profiles have
// the same pack (same layers, same pages); replacing one image's profile
// must not remove the pack the other's still names. Before, it was
// unlinked from the repository and the other image's starts lost it.
func TestProfilePackShared(t *testing.T) {
	srv := start(t, t.TempDir())
	defer srv.stop()
	m1, layer, md, _ := mountedImage(t, srv)
	// A second manifest of the same layers: the first with an annotation.
	code, _, mb := req(t, "GET", srv.URL+"/v2/lib/app/manifests/"+m1.String(), nil, "Accept", ocispec.MediaTypeImageManifest)
	var man ocispec.Manifest
	if code != 200 || json.Unmarshal(mb, &man) != nil {
		t.Fatalf("manifest: %d", code)
	}
	man.Annotations = map[string]string{"v": "2"}
	mb2, _ := json.Marshal(man)
	if code, _, body := req(t, "PUT", srv.URL+"/v2/lib/app/manifests/v2", mb2, "Content-Type", ocispec.MediaTypeImageManifest); code != 201 {
		t.Fatalf("push v2: %d %s", code, body)
	}
	m2 := digest.FromBytes(mb2)
	profile := func(pages [][2]int64) []byte {
		b, _ := json.Marshal(api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{
			Layer: layer, Data: md.Data.Digest, Frames: []int{0}, Pages: pages,
		}}})
		return b
	}
	packOf := func(m digest.Digest) digest.Digest {
		code, _, body := req(t, "GET", srv.URL+api.ProfilePath("lib/app", m), nil)
		var p api.Profile
		if code != 200 || json.Unmarshal(body, &p) != nil || p.Pack == nil {
			t.Fatalf("profile of %s: %d %s", m, code, body)
		}
		return p.Pack.Digest
	}
	for _, m := range []digest.Digest{m1, m2} {
		if code, _, body := req(t, "PUT", srv.URL+api.ProfilePath("lib/app", m), profile([][2]int64{{0, 4}}), "Content-Type", "application/json"); code != 201 {
			t.Fatalf("PUT profile: %d %s", code, body)
		}
	}
	shared := packOf(m1)
	if packOf(m2) != shared {
		t.Fatal("the two profiles have different packs; the test needs one")
	}
	// m1's profile replaced: its pack changes, m2's stays.
	if code, _, body := req(t, "PUT", srv.URL+api.ProfilePath("lib/app", m1), profile([][2]int64{{0, 2}}), "Content-Type", "application/json"); code != 201 {
		t.Fatalf("replace profile: %d %s", code, body)
	}
	if packOf(m1) == shared {
		t.Fatal("replaced profile kept its pack")
	}
	if code, _, _ := req(t, "HEAD", srv.URL+"/v2/lib/app/blobs/"+shared.String(), nil); code != 200 {
		t.Fatalf("the pack m2's profile names: %d after m1's profile was replaced", code)
	}
	// m2's replaced too: nobody names the shared pack, it leaves the repository.
	if code, _, body := req(t, "PUT", srv.URL+api.ProfilePath("lib/app", m2), profile([][2]int64{{0, 2}}), "Content-Type", "application/json"); code != 201 {
		t.Fatalf("replace profile: %d %s", code, body)
	}
	if code, _, _ := req(t, "HEAD", srv.URL+"/v2/lib/app/blobs/"+shared.String(), nil); code != 404 {
		t.Fatalf("a pack no profile names: %d, want 404", code)
	}
}

// TestDerivedProfile: an image without a profile is answered with the
// profile of the image of its repository sharing the most of its layers,
// marked derived; never another repository's; its own, once stored, wins;
// a deleted source image's profile is not used.
func TestDerivedProfile(t *testing.T) {
	srv := start(t, t.TempDir())
	defer srv.stop()
	m1, layer, md, _ := mountedImage(t, srv)
	other := ocilayout.GzipLayer(mustTarOf(t, "other"))
	// v2: the same layer and another.
	m2, descs := pushImage(t, srv.URL, "lib/app", "v2", ocilayout.GzipLayer(mustTarFiles(t)), other)
	if descs[0].Digest != layer {
		t.Fatal("v2 does not share v1's layer")
	}
	get := func(repo string, m digest.Digest) (api.Profile, int) {
		code, _, body := req(t, "GET", srv.URL+api.ProfilePath(repo, m), nil)
		var p api.Profile
		json.Unmarshal(body, &p)
		return p, code
	}
	if _, code := get("lib/app", m2); code != 404 {
		t.Fatalf("v2 before any profile: %d", code)
	}
	prof := api.Profile{Version: layerindex.Version, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0}}}}
	b, _ := json.Marshal(prof)
	if code, _, body := req(t, "PUT", srv.URL+api.ProfilePath("lib/app", m1), b, "Content-Type", "application/json"); code != 201 {
		t.Fatalf("PUT v1: %d %s", code, body)
	}
	if p, code := get("lib/app", m2); code != 200 || !p.Derived || len(p.Layers) != 1 || p.Layers[0].Layer != layer {
		t.Fatalf("v2: %d %+v, want v1's profile, derived", code, p)
	}
	if p, _ := get("lib/app", m1); p.Derived {
		t.Fatal("v1's own profile marked derived")
	}
	// The same image in another repository: no profile of lib/app's.
	m3, _ := pushImage(t, srv.URL, "other/app", "v2", ocilayout.GzipLayer(mustTarFiles(t)), other)
	if _, code := get("other/app", m3); code != 404 {
		t.Fatalf("another repository got lib/app's profile: %d", code)
	}
	// v2's own profile wins.
	b2, _ := json.Marshal(api.Profile{Version: layerindex.Version, Derived: true, Layers: []api.ProfileLayer{{Layer: layer, Data: md.Data.Digest, Frames: []int{0}}}})
	if code, _, body := req(t, "PUT", srv.URL+api.ProfilePath("lib/app", m2), b2, "Content-Type", "application/json"); code != 201 {
		t.Fatalf("PUT v2: %d %s", code, body)
	}
	if p, code := get("lib/app", m2); code != 200 || p.Derived {
		t.Fatalf("v2 after its own PUT: %d derived %v", code, p.Derived)
	}
	// A deleted image's profile is no source.
	req(t, "DELETE", srv.URL+"/v2/lib/app/manifests/"+m2.String(), nil)
	m4, _ := pushImage(t, srv.URL, "lib/app", "v4", other)
	req(t, "DELETE", srv.URL+"/v2/lib/app/manifests/"+m1.String(), nil)
	if _, code := get("lib/app", m4); code != 404 {
		t.Fatalf("v4 derived from deleted images: %d", code)
	}
}

func mustTarOf(t *testing.T, name string) []byte {
	t.Helper()
	b, err := ocilayout.Tar([]ocilayout.Entry{{Name: name, Content: []byte(name)}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustTarFiles(t *testing.T) []byte {
	tr, _ := files(t)
	return tr
}
