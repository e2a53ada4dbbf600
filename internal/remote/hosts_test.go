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
