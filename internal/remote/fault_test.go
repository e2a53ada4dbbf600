package remote_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/remote"
)

// faulty sits in front of the registry and, once armed, lets a test decide
// how each request is answered. It counts requests by path.
type faulty struct {
	mu    sync.Mutex
	fault func(w http.ResponseWriter, r *http.Request, next http.Handler, n int)
	hits  map[string]int
}

func (f *faulty) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		fault := f.fault
		if f.hits == nil {
			f.hits = map[string]int{}
		}
		f.hits[r.URL.Path]++
		n := f.hits[r.URL.Path]
		f.mu.Unlock()
		if fault == nil {
			next.ServeHTTP(w, r)
			return
		}
		fault(w, r, next, n)
	})
}

// arm sets the fault and forgets the counts.
func (f *faulty) arm(fn func(w http.ResponseWriter, r *http.Request, next http.Handler, n int)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault, f.hits = fn, nil
}

func (f *faulty) count(path string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hits[path]
}

// faultRegistry starts a registry behind a faulty front with one image
// pushed as test/app:v1.
func faultRegistry(t *testing.T) (*faulty, string, testImage) {
	f := &faulty{}
	srv := newRegistryServer(t, nil, f.wrap)
	img := buildImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false)
	img.push(t, srv.URL, "test/app", "v1")
	return f, hostOf(srv), img
}

func ociError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`, code, msg)
}

// corrupt serves next's answer with one body byte changed.
func corrupt(w http.ResponseWriter, r *http.Request, next http.Handler) {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	if len(body) > 0 {
		body[len(body)/2] ^= 0x20
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(body)
}

// hang waits until the client goes away.
func hang(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }

func TestRetries(t *testing.T) {
	f, host, img := faultRegistry(t)
	manifestPath := "/v2/test/app/manifests/v1"
	configPath := "/v2/test/app/blobs/" + img.manifest.Config.Digest.String()
	tests := []struct {
		name   string
		fault  func(w http.ResponseWriter, r *http.Request, next http.Handler, n int)
		ok     bool
		want   error // errors.Is target when !ok
		hits   int   // requests to the manifest path
		errHas string
	}{
		{name: "503 twice then 200", hits: 3, ok: true, fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			if r.URL.Path == manifestPath && n <= 2 {
				ociError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "try later")
				return
			}
			next.ServeHTTP(w, r)
		}},
		{name: "429 with Retry-After then 200", hits: 2, ok: true, fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			if r.URL.Path == manifestPath && n == 1 {
				w.Header().Set("Retry-After", "1")
				ociError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", "slow down")
				return
			}
			next.ServeHTTP(w, r)
		}},
		{name: "config blob fails once", hits: 1, ok: true, fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			if r.URL.Path == configPath && n == 1 {
				w.WriteHeader(http.StatusBadGateway)
				return
			}
			next.ServeHTTP(w, r)
		}},
		{name: "connection dropped once", hits: 2, ok: true, fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			if r.URL.Path == manifestPath && n == 1 {
				panic(http.ErrAbortHandler)
			}
			next.ServeHTTP(w, r)
		}},
		{name: "503 forever", hits: 3, errHas: "503 UNAVAILABLE: down for good", fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			ociError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "down for good")
		}},
		{name: "500 without a JSON body", hits: 3, errHas: "500 Internal Server Error: oops", fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			http.Error(w, "oops", http.StatusInternalServerError)
		}},
		{name: "403 is not retried", hits: 1, want: remote.ErrUnauthorized, errHas: "403 DENIED: no", fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			ociError(w, http.StatusForbidden, "DENIED", "no")
		}},
		{name: "400 is not retried", hits: 1, errHas: "400 Bad Request", fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			w.WriteHeader(http.StatusBadRequest)
		}},
		{name: "501 is not retried", hits: 1, errHas: "501", fault: func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			w.WriteHeader(http.StatusNotImplemented)
		}},
	}
	c := newClient(t, remote.Options{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.arm(tt.fault)
			_, err := c.Resolve(context.Background(), parseRef(t, host+"/test/app:v1"))
			if tt.ok && err != nil {
				t.Fatal(err)
			}
			if !tt.ok {
				if err == nil {
					t.Fatal("Resolve succeeded, want an error")
				}
				t.Log(err)
				var re *remote.Error
				if !errors.As(err, &re) {
					t.Errorf("error %v is not an *Error", err)
				}
				if tt.want != nil && !errors.Is(err, tt.want) {
					t.Errorf("error %v is not %v", err, tt.want)
				}
				if !strings.Contains(err.Error(), tt.errHas) {
					t.Errorf("error %q does not contain %q", err, tt.errHas)
				}
			}
			if got := f.count(manifestPath); got != tt.hits {
				t.Errorf("%d manifest requests, want %d", got, tt.hits)
			}
		})
	}
}

// TestBoundedFailures: an unreachable or silent registry makes calls fail
// within the retry budget, never hang.
func TestBoundedFailures(t *testing.T) {
	silent := httptest.NewServer(http.HandlerFunc(hang))
	t.Cleanup(silent.Close)
	// Headers, half the body, then silence.
	stalls := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		w.Write(make([]byte, 500))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	t.Cleanup(stalls.Close)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()

	policy := remote.RetryPolicy{Attempts: 3, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxElapsed: 1500 * time.Millisecond}
	c := newClient(t, remote.Options{Retry: policy, Timeout: 200 * time.Millisecond, RangeTimeout: 100 * time.Millisecond})
	const bound = 3 * time.Second // MaxElapsed plus slack for a loaded machine
	blob := ocispec.Descriptor{Digest: digest.FromString("x"), Size: 1000}
	readAll := func(ctx context.Context, host string) error {
		rc, err := c.FetchBlob(ctx, parseRef(t, host+"/a/b").Repository, blob)
		if err != nil {
			return err
		}
		defer rc.Close()
		_, err = io.Copy(io.Discard, rc)
		return err
	}
	tests := []struct {
		name   string
		call   func(ctx context.Context) error
		errHas string
	}{
		{"resolve from a silent registry", func(ctx context.Context) error {
			_, err := c.Resolve(ctx, parseRef(t, hostOf(silent)+"/a/b:c"))
			return err
		}, "no response within 200ms"},
		{"range from a silent registry", func(ctx context.Context) error {
			_, err := c.ReadRange(ctx, parseRef(t, hostOf(silent)+"/a/b").Repository, blob.Digest, 0, 10)
			return err
		}, "no response within 100ms"},
		{"blob that stalls mid-body", func(ctx context.Context) error { return readAll(ctx, hostOf(stalls)) }, "no response within 200ms"},
		{"mount from a silent registry", func(ctx context.Context) error {
			_, err := c.Mount(ctx, parseRef(t, hostOf(silent)+"/a/b").Repository, blob.Digest)
			return err
		}, "no response within"},
		{"info from a silent registry", func(ctx context.Context) error {
			_, _, err := c.Info(ctx, hostOf(silent))
			return err
		}, "no response within"},
		{"resolve from a closed port", func(ctx context.Context) error {
			_, err := c.Resolve(ctx, parseRef(t, closed+"/a/b:c"))
			return err
		}, "connection refused"},
		{"blob from a closed port", func(ctx context.Context) error { return readAll(ctx, closed) }, "connection refused"},
		{"caller's deadline wins", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			defer cancel()
			_, err := c.Resolve(ctx, parseRef(t, hostOf(silent)+"/a/b:c"))
			if !errors.Is(err, context.DeadlineExceeded) {
				return fmt.Errorf("want DeadlineExceeded, got %w", err)
			}
			return err
		}, "deadline exceeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			err := tt.call(context.Background())
			took := time.Since(start)
			if err == nil {
				t.Fatal("call succeeded")
			}
			t.Logf("after %s: %v", took.Round(time.Millisecond), err)
			if took > bound {
				t.Errorf("call took %s, more than %s", took, bound)
			}
			if !strings.Contains(err.Error(), tt.errHas) {
				t.Errorf("error %q does not contain %q", err, tt.errHas)
			}
		})
	}
}

func TestCorruption(t *testing.T) {
	f, host, img := faultRegistry(t)
	manifestTag := "/v2/test/app/manifests/v1"
	manifestDigest := "/v2/test/app/manifests/" + img.desc.Digest.String()
	configPath := "/v2/test/app/blobs/" + img.manifest.Config.Digest.String()
	layer := img.manifest.Layers[0]
	layerPath := "/v2/test/app/blobs/" + layer.Digest.String()
	c := newClient(t, remote.Options{})
	corruptAt := func(path string) func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
		return func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			if r.URL.Path == path {
				corrupt(w, r, next)
				return
			}
			next.ServeHTTP(w, r)
		}
	}
	resolve := func(ref string) func() error {
		return func() error { _, err := c.Resolve(context.Background(), parseRef(t, host+ref)); return err }
	}
	tests := []struct {
		name  string
		fault func(w http.ResponseWriter, r *http.Request, next http.Handler, n int)
		call  func() error
	}{
		{"manifest by tag against Docker-Content-Digest", corruptAt(manifestTag), resolve("/test/app:v1")},
		{"manifest by digest", corruptAt(manifestDigest), resolve("/test/app@" + img.desc.Digest.String())},
		{"manifest by tag without Docker-Content-Digest, config by digest", func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
			if r.URL.Path == configPath {
				corrupt(w, r, next)
				return
			}
			next.ServeHTTP(headerDropper{w}, r)
		}, resolve("/test/app:v1")},
		{"config", corruptAt(configPath), resolve("/test/app:v1")},
		{"blob", corruptAt(layerPath), func() error {
			rc, err := c.FetchBlob(context.Background(), parseRef(t, host+"/test/app").Repository, layer)
			if err != nil {
				return err
			}
			defer rc.Close()
			_, err = io.Copy(io.Discard, rc)
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.arm(tt.fault)
			err := tt.call()
			if !errors.Is(err, remote.ErrDigestMismatch) {
				t.Fatalf("err = %v, want ErrDigestMismatch", err)
			}
			t.Log(err)
		})
	}
}

// headerDropper hides Docker-Content-Digest.
type headerDropper struct{ http.ResponseWriter }

func (h headerDropper) WriteHeader(code int) {
	h.Header().Del("Docker-Content-Digest")
	h.ResponseWriter.WriteHeader(code)
}

func (h headerDropper) Write(b []byte) (int, error) {
	h.Header().Del("Docker-Content-Digest")
	return h.ResponseWriter.Write(b)
}

func TestFetchBlobResumes(t *testing.T) {
	f, host, img := faultRegistry(t)
	layer := img.manifest.Layers[0]
	path := "/v2/test/app/blobs/" + layer.Digest.String()
	var ranges []string
	var mu sync.Mutex
	f.arm(func(w http.ResponseWriter, r *http.Request, next http.Handler, n int) {
		mu.Lock()
		ranges = append(ranges, r.Header.Get("Range"))
		mu.Unlock()
		if r.URL.Path == path && n <= 2 {
			// Send part of what is asked for, then break the connection.
			rec := httptest.NewRecorder()
			next.ServeHTTP(rec, r)
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(rec.Body.Bytes()[:rec.Body.Len()/3])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		next.ServeHTTP(w, r)
	})
	c := newClient(t, remote.Options{})
	rc, err := c.FetchBlob(context.Background(), parseRef(t, host+"/test/app").Repository, layer)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img.layers[0]) {
		t.Fatal("resumed blob differs")
	}
	mu.Lock()
	defer mu.Unlock()
	var offs []int
	for _, r := range ranges[1:] {
		var off int
		if _, err := fmt.Sscanf(r, "bytes=%d-", &off); err != nil {
			t.Fatalf("Range %q: %v", r, err)
		}
		offs = append(offs, off)
	}
	if len(ranges) != 3 || ranges[0] != "" || offs[0] <= 0 || offs[1] <= offs[0] {
		t.Errorf("requests' Range headers: %q", ranges)
	}
}

func TestReadRangeResponses(t *testing.T) {
	data := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	d := digest.FromBytes(data)
	tests := []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request, n int)
		want    string // "" for an error
		hits    int
	}{
		{"200 with the whole blob is cut", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Write(data)
		}, "abcde", 1},
		{"206 with the asked range", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 10-14/%d", len(data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[10:15])
		}, "abcde", 1},
		{"206 with another range", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 11-15/%d", len(data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[11:16])
		}, "", 1},
		{"206 without Content-Range", func(w http.ResponseWriter, r *http.Request, n int) {
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[10:15])
		}, "", 1},
		{"short body once, then right", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 10-14/%d", len(data)))
			w.Header().Set("Content-Length", "5")
			w.WriteHeader(http.StatusPartialContent)
			if n == 1 {
				w.Write(data[10:12])
				w.(http.Flusher).Flush()
				panic(http.ErrAbortHandler)
			}
			w.Write(data[10:15])
		}, "abcde", 2},
		{"416", func(w http.ResponseWriter, r *http.Request, n int) {
			ociError(w, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID", "no")
		}, "", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, hits := numberedServer(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if r.Header.Get("Range") != "bytes=10-14" {
					t.Errorf("Range = %q", r.Header.Get("Range"))
				}
				tt.handler(w, r, n)
			})
			c := newClient(t, remote.Options{})
			got, err := c.ReadRange(context.Background(), parseRef(t, hostOf(srv)+"/a/b").Repository, d, 10, 5)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("ReadRange = %q, want an error", got)
				}
				t.Log(err)
			} else if err != nil || string(got) != tt.want {
				t.Fatalf("ReadRange = %q, %v; want %q", got, err, tt.want)
			}
			if n := hits(); n != tt.hits {
				t.Errorf("%d requests, want %d", n, tt.hits)
			}
		})
	}
}

func TestReadRangesResponses(t *testing.T) {
	data := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	d := digest.FromBytes(data)
	ranges := [][2]int64{{20, 3}, {10, 5}} // "klm", "abcde"
	writeParts := func(w http.ResponseWriter, parts [][2]int, broken bool) {
		mw := multipart.NewWriter(w)
		w.Header().Set("Content-Type", "multipart/byteranges; boundary="+mw.Boundary())
		w.WriteHeader(http.StatusPartialContent)
		for i, p := range parts {
			pw, _ := mw.CreatePart(textproto.MIMEHeader{"Content-Range": {fmt.Sprintf("bytes %d-%d/%d", p[0], p[1], len(data))}})
			pw.Write(data[p[0] : p[1]+1])
			if broken && i == 0 {
				w.(http.Flusher).Flush()
				panic(http.ErrAbortHandler)
			}
		}
		mw.Close()
	}
	tests := []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request, n int)
		want    string // ranges handed over, by index, joined with "|"
		err     error  // nil: success; else errors.Is
		hits    int
	}{
		{"multipart in the order asked", func(w http.ResponseWriter, r *http.Request, n int) {
			writeParts(w, [][2]int{{20, 22}, {10, 14}}, false)
		}, "0:klm|1:abcde", nil, 1},
		{"multipart in another order", func(w http.ResponseWriter, r *http.Request, n int) {
			writeParts(w, [][2]int{{10, 14}, {20, 22}}, false)
		}, "1:abcde|0:klm", nil, 1},
		{"one part covering both", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 10-22/%d", len(data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[10:23])
		}, "1:abcde|0:klm", nil, 1},
		{"a part missing", func(w http.ResponseWriter, r *http.Request, n int) {
			writeParts(w, [][2]int{{20, 22}}, false)
		}, "0:klm", remote.ErrInvalidResponse, 1},
		{"broken after the first part, then whole", func(w http.ResponseWriter, r *http.Request, n int) {
			writeParts(w, [][2]int{{20, 22}, {10, 14}}, n == 1)
		}, "0:klm|1:abcde", nil, 2},
		{"200 with the whole blob", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Write(data)
		}, "", remote.ErrUnsupported, 1},
		{"a part of absurd length", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Content-Range", "bytes 0-9223372036854775807/*")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data)
		}, "", remote.ErrInvalidResponse, 1},
		{"a part outside the ranges asked", func(w http.ResponseWriter, r *http.Request, n int) {
			writeParts(w, [][2]int{{20, 22}, {0, 14}}, false)
		}, "0:klm", remote.ErrInvalidResponse, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, hits := numberedServer(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if r.Header.Get("Range") != "bytes=20-22,10-14" {
					t.Errorf("Range = %q", r.Header.Get("Range"))
				}
				tt.handler(w, r, n)
			})
			c := newClient(t, remote.Options{})
			var got []string
			err := c.ReadRanges(context.Background(), parseRef(t, hostOf(srv)+"/a/b").Repository, d, ranges, func(i int, b []byte) {
				got = append(got, fmt.Sprintf("%d:%s", i, b))
			})
			if tt.err == nil && err != nil || tt.err != nil && !errors.Is(err, tt.err) {
				t.Fatalf("ReadRanges: %v, want %v", err, tt.err)
			}
			if s := strings.Join(got, "|"); s != tt.want {
				t.Errorf("handed over %q, want %q", s, tt.want)
			}
			if n := hits(); n != tt.hits {
				t.Errorf("%d requests, want %d", n, tt.hits)
			}
		})
	}
}

func TestLayerIndexResponses(t *testing.T) {
	index := bytes.Repeat([]byte("an index "), 1000)
	d := digest.FromBytes(index)
	layer := digest.FromString("layer")
	enc, _ := zstd.NewWriter(nil)
	zindex := enc.EncodeAll(index, nil)
	tests := []struct {
		name    string
		handler func(w http.ResponseWriter, r *http.Request, n int)
		err     error // nil: success
		hits    int
	}{
		{"plain", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Write(index)
		}, nil, 1},
		{"zstd", func(w http.ResponseWriter, r *http.Request, n int) {
			if r.Header.Get("Accept-Encoding") != "zstd" {
				t.Errorf("Accept-Encoding %q", r.Header.Get("Accept-Encoding"))
			}
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Header().Set("Content-Encoding", "zstd")
			w.Write(zindex)
		}, nil, 1},
		{"expanding, then there", func(w http.ResponseWriter, r *http.Request, n int) {
			if n == 1 {
				w.Header().Set("Retry-After", "0")
				w.WriteHeader(http.StatusAccepted)
				return
			}
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Write(index)
		}, nil, 2},
		{"other content", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Write(index[1:])
		}, remote.ErrDigestMismatch, 1},
		{"a small body that expands to a huge one", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Header().Set("Content-Encoding", "zstd")
			w.Write(enc.EncodeAll(make([]byte, 64<<20), nil))
		}, remote.ErrInvalidResponse, 1},
		{"unknown encoding", func(w http.ResponseWriter, r *http.Request, n int) {
			w.Header().Set("Docker-Content-Digest", d.String())
			w.Header().Set("Content-Encoding", "br")
			w.Write(index)
		}, remote.ErrInvalidResponse, 1},
		{"no such route", func(w http.ResponseWriter, r *http.Request, n int) {
			ociError(w, http.StatusNotFound, "NOT_FOUND", "no such extension route")
		}, remote.ErrUnsupported, 1},
		{"layer not in the repository", func(w http.ResponseWriter, r *http.Request, n int) {
			ociError(w, http.StatusNotFound, "BLOB_UNKNOWN", "no")
		}, remote.ErrNotFound, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, hits := numberedServer(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if r.URL.Path != api.IndexPath("a/b", layer) {
					t.Errorf("path %s", r.URL.Path)
				}
				tt.handler(w, r, n)
			})
			c := newClient(t, remote.Options{})
			got, raw, err := c.LayerIndex(context.Background(), parseRef(t, hostOf(srv)+"/a/b").Repository, layer)
			if tt.err == nil && (err != nil || got != d || !bytes.Equal(raw, index)) {
				t.Fatalf("LayerIndex = %s, %d bytes, %v", got, len(raw), err)
			}
			if tt.err != nil && !errors.Is(err, tt.err) {
				t.Fatalf("LayerIndex: %v, want %v", err, tt.err)
			}
			if tt.err == remote.ErrNotFound && errors.Is(err, remote.ErrUnsupported) {
				t.Errorf("a layer not in the repository is taken for a missing route: %v", err)
			}
			if n := hits(); n != tt.hits {
				t.Errorf("%d requests, want %d", n, tt.hits)
			}
		})
	}
}

// numberedServer serves every request with handler, passing its number
// (from 1); hits returns how many came. The server closes with the test.
func numberedServer(t *testing.T, handler func(w http.ResponseWriter, r *http.Request, n int)) (srv *httptest.Server, hits func() int) {
	var mu sync.Mutex
	count := 0
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		count++
		n := count
		mu.Unlock()
		handler(w, r, n)
	}))
	t.Cleanup(srv.Close)
	return srv, func() int {
		mu.Lock()
		defer mu.Unlock()
		return count
	}
}

func TestReadRangesRemembersSingleRangeRegistries(t *testing.T) {
	data := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	srv, hits := numberedServer(t, func(w http.ResponseWriter, r *http.Request, n int) { w.Write(data) })
	c := newClient(t, remote.Options{})
	repo := parseRef(t, hostOf(srv)+"/a/b").Repository
	for range 2 {
		err := c.ReadRanges(context.Background(), repo, digest.FromBytes(data), [][2]int64{{1, 2}, {5, 2}}, func(int, []byte) {})
		if !errors.Is(err, remote.ErrUnsupported) {
			t.Fatalf("ReadRanges: %v, want ErrUnsupported", err)
		}
	}
	if n := hits(); n != 1 {
		t.Errorf("%d requests, want 1: a registry that answered with the whole blob is not asked for several ranges again", n)
	}
}
