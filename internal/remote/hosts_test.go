package remote_test

import (
	"testing"

	"github.com/strata-oci/strata/internal/remote"
)

func TestHosts(t *testing.T) {
	var none *remote.Hosts
	if none.Lookup("r.example").PlainHTTP {
		t.Error("nil Hosts reaches a registry over plain HTTP")
	}
	h := remote.PlainHosts(remote.IsLoopback)
	for reg, want := range map[string]bool{"127.0.0.1:5000": true, "localhost": true, "r.example": false} {
		if got := h.Lookup(reg).PlainHTTP; got != want {
			t.Errorf("Lookup(%q).PlainHTTP = %v, want %v", reg, got, want)
		}
	}
	h.AllowPlainHTTP("r.example")
	if !h.Lookup("r.example").PlainHTTP || h.Lookup("s.example").PlainHTTP {
		t.Error("AllowPlainHTTP did not mark exactly its registry")
	}
	var zero remote.Hosts
	zero.AllowPlainHTTP("r.example")
	if !zero.Lookup("r.example").PlainHTTP {
		t.Error("the zero Hosts forgot AllowPlainHTTP")
	}
}

// TestHostsPlainFirst: a registry marked plain HTTP is answered from
// memory, without asking Config (which may read files on every call).
func TestHostsPlainFirst(t *testing.T) {
	calls := 0
	h := &remote.Hosts{Config: func(string) remote.Host { calls++; return remote.Host{} }}
	h.AllowPlainHTTP("r.example")
	if !h.Lookup("r.example").PlainHTTP {
		t.Error("AllowPlainHTTP's registry is not reached over plain HTTP")
	}
	if calls != 0 {
		t.Errorf("Config was asked %d times for a registry marked plain HTTP", calls)
	}
	h.Lookup("s.example")
	if calls != 1 {
		t.Errorf("Config was asked %d times for another registry, want 1", calls)
	}
}
