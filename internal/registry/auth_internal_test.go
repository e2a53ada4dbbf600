package registry

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// TestAuthCost: verified credentials are not compared again, and a
// client that keeps sending wrong ones is answered 429 without a bcrypt
// comparison, while another client still authenticates.
func TestAuthCost(t *testing.T) {
	hash, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	c := newChecker(Users{"alice": hash})
	h := authorize(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), AuthConfig{Users: c.users}, c)
	req := func(client, user, pass string) int {
		r := httptest.NewRequest("PUT", "/v2/app/manifests/x", nil)
		r.RemoteAddr = client + ":1234"
		r.SetBasicAuth(user, pass)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w.Code
	}
	for range 50 {
		if code := req("10.0.0.1", "alice", "s3cret"); code != http.StatusOK {
			t.Fatalf("valid credentials: %d", code)
		}
	}
	if c.compares != 1 {
		t.Errorf("50 requests with the same valid credentials made %d bcrypt comparisons, want 1", c.compares)
	}
	codes := map[int]int{}
	start := time.Now()
	for range 100 {
		codes[req("10.0.0.2", "mallory", "guess")]++
	}
	// The burst, then one a second (the flood may take seconds on a
	// loaded machine: each comparison costs ~100 ms of CPU).
	bound := authFailBurst + int(time.Since(start)/authFailEvery) + 1
	if codes[http.StatusTooManyRequests] < 100-bound || c.compares > 1+bound {
		t.Errorf("100 bogus requests: %v, %d comparisons in all; want at most %d comparisons, the rest 429", codes, c.compares, 1+bound)
	}
	if code := req("10.0.0.3", "alice", "s3cret"); code != http.StatusOK {
		t.Errorf("another client after the flood: %d", code)
	}
	if code := req("10.0.0.3", "alice", "wrong"); code != http.StatusUnauthorized {
		t.Errorf("a wrong password: %d, want 401", code)
	}
}
