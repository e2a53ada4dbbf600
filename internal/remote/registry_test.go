package remote_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/remote"
)

// Tests against strata's own registry on a real socket.

func TestResolve(t *testing.T) {
	base, host := newRegistry(t)
	amd64 := ocispec.Platform{OS: "linux", Architecture: "amd64"}
	oci := buildImage(t, amd64, false)
	oci.push(t, base, "test/app", "v1")
	docker := buildImage(t, amd64, true)
	docker.push(t, base, "test/docker", "v1")

	tests := []struct {
		name string
		ref  string
		img  testImage
	}{
		{"oci by tag", host + "/test/app:v1", oci},
		{"oci by digest", host + "/test/app@" + oci.desc.Digest.String(), oci},
		{"oci by tag and digest", host + "/test/app:v1@" + oci.desc.Digest.String(), oci},
		{"docker media types", host + "/test/docker:v1", docker},
	}
	c := newClient(t, remote.Options{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := parseRef(t, tt.ref)
			img, err := c.Resolve(context.Background(), r)
			if err != nil {
				t.Fatal(err)
			}
			want := &remote.Image{
				Ref:         r,
				Digest:      tt.img.desc.Digest,
				MediaType:   tt.img.manifest.MediaType,
				Platform:    amd64,
				Manifest:    tt.img.manifest,
				Config:      tt.img.config,
				RawManifest: tt.img.raw,
				RawConfig:   tt.img.rawCfg,
			}
			if diff := cmp.Diff(want, img); diff != "" {
				t.Errorf("Resolve mismatch (-want +got):\n%s", diff)
			}
			if img.Repository() != r.Repository {
				t.Errorf("Repository() = %v", img.Repository())
			}
		})
	}
}

func TestResolveIndex(t *testing.T) {
	base, host := newRegistry(t)
	host0 := remote.HostPlatform()
	platforms := []ocispec.Platform{
		{OS: "linux", Architecture: "amd64"},
		{OS: "linux", Architecture: "arm64", Variant: "v8"},
		{OS: "linux", Architecture: "arm", Variant: "v6"},
		{OS: "linux", Architecture: "arm", Variant: "v7"},
		{OS: "linux", Architecture: "s390x"},
		{OS: "unknown", Architecture: "unknown"},
	}
	if _, ok := remote.SelectPlatform(descsOf(platforms), host0); !ok {
		platforms = append(platforms, host0)
	}
	imgs := map[string]testImage{}
	var list []testImage
	for _, p := range platforms {
		img := buildImage(t, p, false)
		imgs[platformName(p)] = img
		list = append(list, img)
	}
	idx := pushIndex(t, base, "multi/oci", "v1", false, list...)
	pushIndex(t, base, "multi/docker", "v1", true, list...)
	pushIndex(t, base, "multi/noamd", "v1", false, imgs["linux/arm64/v8"], imgs["linux/s390x/"])

	tests := []struct {
		name     string
		ref      string
		platform *ocispec.Platform
		want     string // platformName of the chosen image; "" for ErrNotFound
	}{
		{"host platform", host + "/multi/oci:v1", nil, "host"},
		{"host platform from docker list", host + "/multi/docker:v1", nil, "host"},
		{"index by digest", host + "/multi/oci@" + idx.Digest.String(), nil, "host"},
		{"arm64", host + "/multi/oci:v1", &ocispec.Platform{OS: "linux", Architecture: "arm64"}, "linux/arm64/v8"},
		{"armv7 picks v7 over v6", host + "/multi/oci:v1", &ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}, "linux/arm/v7"},
		{"armv6 runs only v6", host + "/multi/oci:v1", &ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v6"}, "linux/arm/v6"},
		{"absent platform falls back to linux/amd64", host + "/multi/oci:v1", &ocispec.Platform{OS: "linux", Architecture: "riscv64"}, "linux/amd64/"},
		{"no match and no amd64", host + "/multi/noamd:v1", &ocispec.Platform{OS: "linux", Architecture: "riscv64"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClient(t, remote.Options{Platform: tt.platform})
			img, err := c.Resolve(context.Background(), parseRef(t, tt.ref))
			if tt.want == "" {
				if !errors.Is(err, remote.ErrNotFound) {
					t.Fatalf("Resolve = %v, want ErrNotFound", err)
				}
				t.Log(err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := tt.want
			if want == "host" {
				d, _ := remote.SelectPlatform(descsOf(platforms), host0)
				want = platformName(*d.Platform)
			}
			wantImg, ok := imgs[want]
			if !ok {
				t.Fatalf("test bug: no image %s", want)
			}
			if img.Digest != wantImg.desc.Digest {
				t.Errorf("chose %s (%v), want %s", img.Digest, img.Platform, tt.want)
			}
			if img.IndexDigest == "" || img.IndexDigest == img.Digest {
				t.Errorf("IndexDigest = %q", img.IndexDigest)
			}
			if diff := cmp.Diff(wantImg.config, img.Config); diff != "" {
				t.Errorf("config mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestResolveNotFound(t *testing.T) {
	base, host := newRegistry(t)
	buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false).push(t, base, "test/app", "v1")
	c := newClient(t, remote.Options{})
	for _, ref := range []string{host + "/test/app:nope", host + "/test/other:v1", host + "/test/app@" + dgA} {
		_, err := c.Resolve(context.Background(), parseRef(t, ref))
		if !errors.Is(err, remote.ErrNotFound) {
			t.Errorf("Resolve(%s) = %v, want ErrNotFound", ref, err)
			continue
		}
		var re *remote.Error
		if !errors.As(err, &re) || re.StatusCode != 404 || !strings.Contains(err.Error(), ": 404 ") {
			t.Errorf("Resolve(%s) error %q is not a readable *Error", ref, err)
		}
	}
	_, err := c.Resolve(context.Background(), parseRef(t, host+"/test/app:nope"))
	want := "GET http://" + host + "/v2/test/app/manifests/nope: 404 MANIFEST_UNKNOWN: manifest unknown"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not read %q", err, want)
	}
}

func TestFetchBlob(t *testing.T) {
	base, host := newRegistry(t)
	data := bytes.Repeat([]byte("0123456789"), 100_000)
	desc := pushBlob(t, base, "test/blob", ocispec.MediaTypeImageLayer, data)
	repo := parseRef(t, host+"/test/blob").Repository
	c := newClient(t, remote.Options{})

	rc, err := c.FetchBlob(context.Background(), repo, desc)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("FetchBlob read %d bytes, err %v", len(got), err)
	}

	// The registry's content, asked for by the wrong descriptor.
	for name, d := range map[string]ocispec.Descriptor{
		"size too large": {Digest: desc.Digest, Size: desc.Size + 1},
		"size too small": {Digest: desc.Digest, Size: desc.Size - 1},
	} {
		rc, err := c.FetchBlob(context.Background(), repo, d)
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if !errors.Is(err, remote.ErrDigestMismatch) {
			t.Errorf("%s: read error %v, want ErrDigestMismatch", name, err)
		}
	}

	_, err = c.FetchBlob(context.Background(), repo, ocispec.Descriptor{Digest: digest.FromString("absent"), Size: 6})
	if !errors.Is(err, remote.ErrNotFound) {
		t.Errorf("FetchBlob(absent) = %v, want ErrNotFound", err)
	}
}

func TestReadRange(t *testing.T) {
	base, host := newRegistry(t)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	desc := pushBlob(t, base, "test/range", ocispec.MediaTypeImageLayer, data)
	repo := parseRef(t, host+"/test/range").Repository
	c := newClient(t, remote.Options{})
	size := int64(len(data))
	tests := []struct {
		name   string
		off, n int64
		ok     bool
	}{
		{"first byte", 0, 1, true},
		{"head", 0, 4096, true},
		{"middle", 123_457, 65_536, true},
		{"tail", size - 1000, 1000, true},
		{"whole", 0, size, true},
		{"past the end", size - 10, 20, false},
		{"beyond the end", size + 10, 20, false},
		{"zero length", 10, 0, false},
		{"negative offset", -1, 10, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := c.ReadRange(context.Background(), repo, desc.Digest, tt.off, tt.n)
			if !tt.ok {
				if err == nil {
					t.Fatalf("ReadRange(%d, %d) succeeded, want error", tt.off, tt.n)
				}
				t.Log(err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data[tt.off:tt.off+tt.n]) {
				t.Errorf("ReadRange(%d, %d) returned other bytes", tt.off, tt.n)
			}
		})
	}
}

func TestInfoWithoutExtension(t *testing.T) {
	_, host := newRegistry(t)
	c := newClient(t, remote.Options{})
	info, ok, err := c.Info(context.Background(), host)
	if err != nil || ok || info != nil {
		t.Errorf("Info = %v, %v, %v; want nil, false, nil", info, ok, err)
	}
}

func descsOf(ps []ocispec.Platform) []ocispec.Descriptor {
	var ds []ocispec.Descriptor
	for i := range ps {
		ds = append(ds, ocispec.Descriptor{Platform: &ps[i]})
	}
	return ds
}

func TestReadRanges(t *testing.T) {
	base, host := newRegistry(t)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	desc := pushBlob(t, base, "test/ranges", ocispec.MediaTypeImageLayer, data)
	repo := parseRef(t, host+"/test/ranges").Repository
	c := newClient(t, remote.Options{})
	// Not in offset order: the registry answers in the order asked.
	ranges := [][2]int64{{900_000, 4096}, {0, 1}, {500_000, 65_536}, {1<<20 - 10, 10}, {4096, 100}}
	var order []int
	err := c.ReadRanges(context.Background(), repo, desc.Digest, ranges, func(i int, b []byte) {
		order = append(order, i)
		r := ranges[i]
		if !bytes.Equal(b, data[r[0]:r[0]+r[1]]) {
			t.Errorf("range %d (%d+%d): other bytes", i, r[0], r[1])
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []int{0, 1, 2, 3, 4}; !slices.Equal(order, want) {
		t.Errorf("ranges handed over in order %v, want %v", order, want)
	}
	for name, bad := range map[string][][2]int64{
		"overlap":      {{0, 100}, {50, 100}},
		"twice":        {{0, 100}, {0, 100}},
		"zero length":  {{10, 0}},
		"past the end": {{1<<20 - 10, 20}},
		"negative":     {{-1, 10}},
	} {
		err := c.ReadRanges(context.Background(), repo, desc.Digest, bad, func(int, []byte) {})
		if err == nil {
			t.Errorf("%s: ReadRanges succeeded, want an error", name)
		}
	}
}
