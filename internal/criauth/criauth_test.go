package criauth_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/strata-oci/strata/internal/criauth"
	"github.com/strata-oci/strata/internal/remote"
)

func TestKeychain(t *testing.T) {
	k := criauth.NewKeychain()
	fallbackErr := errors.New("asked the Docker config")
	creds := k.Credentials(func(ctx context.Context, registry string) (remote.Credential, error) {
		return remote.Credential{}, fallbackErr
	})
	ask := func(image, registry string) (remote.Credential, error) {
		ctx := context.Background()
		if image != "" {
			ctx = remote.WithImageRef(ctx, image)
		}
		return creds(ctx, registry)
	}

	// Nothing kept: the next source is asked.
	if _, err := ask("reg.example/team/app:1", "reg.example"); !errors.Is(err, fallbackErr) {
		t.Fatalf("empty keychain: %v", err)
	}
	// A pull without credentials keeps nothing.
	k.Record("reg.example/team/app:1", &runtime.AuthConfig{})
	k.Record("reg.example/team/app:1", nil)
	if _, err := ask("reg.example/team/app:1", "reg.example"); !errors.Is(err, fallbackErr) {
		t.Fatalf("a pull without credentials was kept: %v", err)
	}

	k.Record("reg.example/team/app:1", &runtime.AuthConfig{Username: "alice", Password: "a"})
	k.Record("reg.example/other/db@sha256:"+fmt.Sprintf("%064x", 1), &runtime.AuthConfig{
		Auth: base64.StdEncoding.EncodeToString([]byte("bob:b"))})
	k.Record("docker.io/library/python:3", &runtime.AuthConfig{IdentityToken: "refresh"})
	for _, c := range []struct {
		image, registry string
		want            remote.Credential
	}{
		{"reg.example/team/app:2", "reg.example", remote.Credential{Username: "alice", Password: "a"}}, // by repository
		{"reg.example/other/db:latest", "reg.example", remote.Credential{Username: "bob", Password: "b"}},
		{"reg.example/third:1", "reg.example", remote.Credential{Username: "bob", Password: "b"}}, // the registry's latest pull
		{"", "reg.example", remote.Credential{Username: "bob", Password: "b"}},                    // no image (a background read)
		{"python:3", "docker.io", remote.Credential{IdentityToken: "refresh"}},                    // normalized
	} {
		got, err := ask(c.image, c.registry)
		if err != nil || got != c.want {
			t.Errorf("%q at %s: %+v, %v; want %+v", c.image, c.registry, got, err, c.want)
		}
	}
	// Another registry: not these.
	if _, err := ask("elsewhere.example/team/app:1", "elsewhere.example"); !errors.Is(err, fallbackErr) {
		t.Errorf("another registry got a kept credential: %v", err)
	}
	// A pull with new credentials replaces the old.
	k.Record("reg.example/team/app:3", &runtime.AuthConfig{Username: "alice", Password: "rotated"})
	if got, _ := ask("reg.example/team/app:1", "reg.example"); got.Password != "rotated" {
		t.Errorf("after a new pull: %+v", got)
	}
	if err := k.Record("reg.example/team/app:1", &runtime.AuthConfig{Auth: "%%%"}); err == nil {
		t.Error("an auth that is not base64 was accepted")
	}
}

// TestKeychainBounded: the least recently pulled repositories' credentials
// go beyond the bound.
func TestKeychainBounded(t *testing.T) {
	k := criauth.NewKeychain()
	creds := k.Credentials(nil)
	for i := range 1100 {
		k.Record(fmt.Sprintf("reg%d.example/app:1", i), &runtime.AuthConfig{Username: "u", Password: fmt.Sprint(i)})
	}
	if got, _ := creds(context.Background(), "reg0.example"); got != (remote.Credential{}) {
		t.Errorf("the oldest of 1100 pulls is still kept: %+v", got)
	}
	if got, _ := creds(context.Background(), "reg1099.example"); got.Password != "1099" {
		t.Errorf("the latest pull is not kept: %+v", got)
	}
}
