package remote

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
)

// FuzzReadRanges serves a hostile registry's answers to the node's ranged
// blob reads (ReadRanges: one multi-range request for a profile's early
// frames; ReadRange: one frame): parts at offsets and of lengths the
// fuzzer picks, cut short, out of order or outside the ranges asked, in a
// multipart/byteranges body or alone, a body that is not multipart at all,
// or the whole blob. The part bodies are the blob's bytes where their
// Content-Range says (the registry lies about what it sends, not about the
// blob: the node verifies frames against the index later). Oracles: no
// panic; each range asked is handed over at most once, with its length;
// all of them when there is no error; and, but for a raw body, with the
// blob's bytes. The seeds run in every `go test`; to search:
//
//	go test -run '^$' -fuzz '^FuzzReadRanges$' -fuzztime 60s ./internal/remote/
func FuzzReadRanges(f *testing.F) {
	blob := make([]byte, 70000)
	for i := range blob {
		blob[i] = byte(i*7 + i/251)
	}
	// asked: (offset, length-1) pairs of uint16; parts: (offset, length-1,
	// cut) of uint16, uint16, uint8.
	enc := func(v ...int) []byte {
		var b []byte
		for _, x := range v {
			b = binary.LittleEndian.AppendUint16(b, uint16(x))
		}
		return b
	}
	part := func(off, n, cut int) []byte {
		return append(enc(off, n-1), byte(cut))
	}
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	asked := enc(100, 99, 1000, 9, 5000, 499)
	f.Add(asked, cat(part(100, 100, 0), part(1000, 10, 0), part(5000, 500, 0)), uint8(1), []byte(nil))
	f.Add(asked, cat(part(100, 5400, 0)), uint8(1), []byte(nil))                                       // one joined part
	f.Add(asked, cat(part(5000, 500, 0), part(100, 100, 0), part(1000, 10, 0)), uint8(1), []byte(nil)) // out of order
	f.Add(asked, cat(part(100, 100, 0), part(100, 100, 0), part(150, 20, 0)), uint8(1), []byte(nil))   // twice, and within a range
	f.Add(asked, cat(part(100, 100, 7), part(1000, 10, 0)), uint8(1), []byte(nil))                     // cut short
	f.Add(asked, cat(part(0, 200, 0), part(5400, 200, 0)), uint8(1), []byte(nil))                      // outside
	f.Add(enc(100, 99), cat(part(100, 100, 0)), uint8(0), []byte(nil))
	f.Add(enc(100, 99), cat(part(100, 101, 0)), uint8(0), []byte(nil))
	f.Add(asked, []byte(nil), uint8(3), []byte(nil))
	f.Add(asked, []byte(nil), uint8(2), []byte("--B\r\nContent-Range: bytes 100-199/70000\r\n\r\nxx\r\n--B--\r\n"))
	f.Add(asked, []byte(nil), uint8(2), []byte("--B\r\nContent-Range: bytes 100-9223372036854775807/*\r\n\r\n\r\n--B\r\n"))

	var (
		mu    sync.Mutex
		serve func(w http.ResponseWriter)
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		s := serve
		mu.Unlock()
		s(w)
	}))
	defer srv.Close()
	repo := Repository{Registry: strings.TrimPrefix(srv.URL, "http://"), Name: "app"}
	opts := Options{Hosts: PlainHosts(IsLoopback), Retry: RetryPolicy{Attempts: 1}}
	client := New(opts)
	d := digest.FromBytes(blob)

	f.Fuzz(func(t *testing.T, askedB, partsB []byte, mode uint8, raw []byte) {
		var ranges [][2]int64
		for i := 0; i+4 <= len(askedB) && len(ranges) < 8; i += 4 {
			ranges = append(ranges, [2]int64{int64(binary.LittleEndian.Uint16(askedB[i:])), 1 + int64(binary.LittleEndian.Uint16(askedB[i+2:])%1024)})
		}
		if len(ranges) == 0 {
			return
		}
		type fpart struct {
			cr   string
			body []byte
		}
		var parts []fpart
		for i := 0; i+5 <= len(partsB) && len(parts) < 16; i += 5 {
			off := int(binary.LittleEndian.Uint16(partsB[i:]))
			n := 1 + int(binary.LittleEndian.Uint16(partsB[i+2:]))
			cut := int(partsB[i+4])
			body := blob[off:min(off+n, len(blob))]
			body = body[:max(0, len(body)-cut)]
			parts = append(parts, fpart{fmt.Sprintf("bytes %d-%d/%d", off, off+n-1, len(blob)), body})
		}
		mode %= 4
		mu.Lock()
		serve = func(w http.ResponseWriter) {
			switch mode {
			case 0: // one part, alone
				if len(parts) > 0 {
					w.Header().Set("Content-Range", parts[0].cr)
					w.WriteHeader(http.StatusPartialContent)
					w.Write(parts[0].body)
				} else {
					w.WriteHeader(http.StatusPartialContent)
				}
			case 1: // multipart/byteranges
				var b bytes.Buffer
				mw := multipart.NewWriter(&b)
				for _, p := range parts {
					pw, _ := mw.CreatePart(textproto.MIMEHeader{"Content-Type": {"application/octet-stream"}, "Content-Range": {p.cr}})
					pw.Write(p.body)
				}
				mw.Close()
				w.Header().Set("Content-Type", "multipart/byteranges; boundary="+mw.Boundary())
				w.WriteHeader(http.StatusPartialContent)
				w.Write(b.Bytes())
			case 2: // a body of the fuzzer's
				w.Header().Set("Content-Type", "multipart/byteranges; boundary=B")
				w.WriteHeader(http.StatusPartialContent)
				w.Write(raw)
			case 3: // the whole blob
				w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
				w.Write(blob)
			}
		}
		mu.Unlock()

		c := client
		if mode == 3 {
			c = New(opts) // it remembers registries that answer so
		}
		handed := make([]bool, len(ranges))
		err := c.ReadRanges(context.Background(), repo, d, ranges, func(i int, b []byte) {
			if i < 0 || i >= len(ranges) || handed[i] {
				t.Fatalf("range %d handed over twice or unasked", i)
			}
			handed[i] = true
			r := ranges[i]
			if int64(len(b)) != r[1] {
				t.Fatalf("range %v handed over with %d bytes", r, len(b))
			}
			if mode != 2 && (r[0]+r[1] > int64(len(blob)) || !bytes.Equal(b, blob[r[0]:r[0]+r[1]])) {
				t.Fatalf("range %v handed over with bytes that are not the blob's", r)
			}
		})
		if err == nil {
			for i, h := range handed {
				if !h {
					t.Fatalf("no error, range %v not handed over", ranges[i])
				}
			}
		}
		sorted := slices.SortedFunc(slices.Values(ranges), func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
		valid := true // ReadRanges refuses ranges that overlap
		for i := 1; i < len(sorted); i++ {
			valid = valid && sorted[i-1][0]+sorted[i-1][1] <= sorted[i][0]
		}
		if mode == 3 && valid && (err == nil || !errors.Is(err, ErrUnsupported) || slices.Contains(handed, true)) {
			t.Fatalf("the whole blob for several ranges: %v, handed %v", err, handed)
		}
		r := ranges[0]
		b, err := c.ReadRange(context.Background(), repo, d, r[0], r[1])
		if err == nil && (int64(len(b)) != r[1] || mode != 2 && (r[0]+r[1] > int64(len(blob)) || !bytes.Equal(b, blob[r[0]:r[0]+r[1]]))) {
			t.Fatalf("ReadRange %v: %d bytes, not the blob's", r, len(b))
		}
	})
}
