package remote_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/strata-oci/strata/internal/registry"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/internal/store"
)

// recorder keeps the requests a registry was sent.
type recorder struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func (rec *recorder) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, r.Clone(context.Background()))
		rec.mu.Unlock()
		next.ServeHTTP(w, r)
	})
}

// count returns how many requests had a path containing s.
func (rec *recorder) count(s string) int {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	n := 0
	for _, r := range rec.reqs {
		if strings.Contains(r.URL.Path, s) {
			n++
		}
	}
	return n
}

func (rec *recorder) all() []*http.Request {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]*http.Request(nil), rec.reqs...)
}

// writeHosts writes containerd's hosts.toml for registry under dir.
func writeHosts(t *testing.T, dir, registry, toml string) {
	t.Helper()
	d := filepath.Join(dir, registry)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestHostsDirMirrors: a registry with a mirror in hosts.toml (pull only):
// manifests by tag go to the server (the mirror may not resolve), blobs to
// the mirror first, with ?ns=<registry> as containerd sends, and to the
// server when the mirror does not have them; headers of hosts.toml are
// sent.
func TestHostsDirMirrors(t *testing.T) {
	var upRec, mirRec recorder
	up := newRegistryServer(t, nil, upRec.wrap)
	mirror := newRegistryServer(t, nil, mirRec.wrap)
	img := buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false)
	img.push(t, up.URL, "lib/app", "v1")
	// The mirror has the manifest and the config, and one of two layers.
	// (The second layer is pushed for the manifest, which a registry
	// refuses without its blobs, and deleted after it.)
	pushBlob(t, mirror.URL, "lib/app", img.manifest.Layers[0].MediaType, img.layers[0])
	pushBlob(t, mirror.URL, "lib/app", img.manifest.Layers[1].MediaType, img.layers[1])
	pushBlob(t, mirror.URL, "lib/app", img.manifest.Config.MediaType, img.rawCfg)
	pushManifest(t, mirror.URL, "lib/app", img.desc.Digest.String(), img.manifest.MediaType, img.raw)
	req, _ := http.NewRequest("DELETE", mirror.URL+"/v2/lib/app/blobs/"+img.manifest.Layers[1].Digest.String(), nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("delete the mirror's second layer: %v %v", resp, err)
	}

	dir := t.TempDir()
	upHost := hostOf(up)
	writeHosts(t, dir, upHost, `server = "http://`+upHost+`"

[host."http://`+hostOf(mirror)+`"]
  capabilities = ["pull"]
  [host."http://`+hostOf(mirror)+`".header]
    x-strata-test = "mirror"
`)
	c := newClient(t, remote.Options{Hosts: &remote.Hosts{Dir: dir}})
	ctx := context.Background()
	ref := parseRef(t, upHost+"/lib/app:v1")
	got, err := c.Resolve(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != img.desc.Digest {
		t.Fatalf("resolved %s, want %s", got.Digest, img.desc.Digest)
	}
	if n := mirRec.count("/manifests/v1"); n != 0 {
		t.Errorf("the mirror, without resolve, was asked for the tag %d times", n)
	}
	if n := upRec.count("/manifests/v1"); n == 0 {
		t.Error("the server was not asked for the tag")
	}
	for i, l := range img.manifest.Layers {
		rc, err := c.FetchBlob(ctx, ref.Repository, l)
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		io.Copy(io.Discard, rc)
		rc.Close()
	}
	blob := func(i int) string { return "/blobs/" + img.manifest.Layers[i].Digest.String() }
	if mirRec.count(blob(0)) != 1 || upRec.count(blob(0)) != 0 {
		t.Errorf("layer 0 (on the mirror): mirror asked %d times, server %d; want 1, 0", mirRec.count(blob(0)), upRec.count(blob(0)))
	}
	if mirRec.count(blob(1)) == 0 || upRec.count(blob(1)) != 1 {
		t.Errorf("layer 1 (not on the mirror): mirror asked %d times, server %d; want ≥1, 1", mirRec.count(blob(1)), upRec.count(blob(1)))
	}
	for _, r := range mirRec.all() {
		if r.Method == http.MethodPut || r.Method == http.MethodPost || r.Method == http.MethodPatch || r.Method == http.MethodDelete {
			continue // the test's own pushes
		}
		if ns := r.URL.Query().Get("ns"); ns != upHost {
			t.Errorf("%s %s on the mirror: ns=%q, want %q", r.Method, r.URL, ns, upHost)
		}
		if h := r.Header.Get("X-Strata-Test"); h != "mirror" {
			t.Errorf("%s %s on the mirror: header x-strata-test %q, want the hosts.toml's", r.Method, r.URL, h)
		}
	}
}

// TestHostsDirOverridePath: a host whose API root is elsewhere than /v2
// (override_path) is asked there.
func TestHostsDirOverridePath(t *testing.T) {
	var rec recorder
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(st, registry.Options{})
	// The registry's API under /mirror/api instead of /v2.
	srv := httptest.NewServer(rec.wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, ok := strings.CutPrefix(r.URL.Path, "/mirror/api")
		if !ok {
			http.NotFound(w, r)
			return
		}
		r.URL.Path = "/v2" + p
		reg.ServeHTTP(w, r)
	})))
	t.Cleanup(srv.Close)
	base, host := newRegistry(t)
	img := buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false)
	img.push(t, base, "lib/app", "v1")
	img.push(t, srv.URL+"/mirror/api", "lib/app", "v1")

	dir := t.TempDir()
	writeHosts(t, dir, host, `server = "http://`+host+`"

[host."http://`+hostOf(srv)+`/mirror/api"]
  capabilities = ["pull", "resolve"]
  override_path = true
`)
	c := newClient(t, remote.Options{Hosts: &remote.Hosts{Dir: dir}})
	if _, err := c.Resolve(context.Background(), parseRef(t, host+"/lib/app:v1")); err != nil {
		t.Fatal(err)
	}
	if n := rec.count("/mirror/api/lib/app/manifests/v1"); n != 1 {
		t.Errorf("the mirror was asked for /mirror/api/lib/app/manifests/v1 %d times, want 1; asked: %v", n, rec.all())
	}
}

// TestHostsDirTLS: hosts.toml's ca and client certificates reach a
// registry that requires both; without them, or with a CA file that
// cannot be read, requests fail with a reason, and skip_verify reaches a
// registry whose certificate is not trusted.
func TestHostsDirTLS(t *testing.T) {
	dir := t.TempDir()
	clientCert, clientKey, clientPool := newClientCert(t, dir)

	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(st, registry.Options{})
	srv := httptest.NewUnstartedServer(reg)
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: clientPool}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	plain := httptest.NewServer(reg) // the same registry, for the test's pushes
	t.Cleanup(plain.Close)
	img := buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false)
	img.push(t, plain.URL, "lib/app", "v1")
	host := hostOf(srv)
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)

	resolve := func(toml string) error {
		d := t.TempDir()
		writeHosts(t, d, host, toml)
		c := newClient(t, remote.Options{Hosts: &remote.Hosts{Dir: d}})
		_, err := c.Resolve(context.Background(), parseRef(t, host+"/lib/app:v1"))
		return err
	}
	server := `server = "https://` + host + `"` + "\n"
	if err := resolve(server + `ca = "` + caFile + `"
client = [["` + clientCert + `", "` + clientKey + `"]]
`); err != nil {
		t.Errorf("with ca and client: %v", err)
	}
	if err := resolve(server + `ca = "` + caFile + `"` + "\n"); err == nil {
		t.Error("without a client certificate: no error")
	} else {
		t.Logf("without a client certificate: %v", err)
	}
	if err := resolve(server + `client = [["` + clientCert + `", "` + clientKey + `"]]` + "\n"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("without the CA: %v, want a certificate error", err)
	}
	if err := resolve(server + `skip_verify = true
client = [["` + clientCert + `", "` + clientKey + `"]]
`); err != nil {
		t.Errorf("skip_verify: %v", err)
	}
	missing := filepath.Join(dir, "missing.pem")
	if err := resolve(server + `ca = "` + missing + `"` + "\n"); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("a CA file that is missing: %v, want an error naming it", err)
	}
}

// newClientCert writes a self-signed client certificate and its key under
// dir and returns their paths and a pool trusting it.
func newClientCert(t *testing.T, dir string) (string, string, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "strata-test-client"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "client.cert"), filepath.Join(dir, "client.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certFile, keyFile, pool
}
