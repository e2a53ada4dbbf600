// Package criauth gives the snapshotter the credentials of Kubernetes image
// pull secrets. The kubelet sends a pod's pull secret only with the CRI
// PullImage request, to the image service; containerd does not pass it on
// to snapshotters. So the snapshotter serves the CRI image service itself,
// as a proxy in front of containerd's (the kubelet's
// --image-service-endpoint points at it): every call is forwarded, and a
// PullImage's credentials are kept, in memory, for the image it pulls,
// where the snapshotter's registry client finds them while it mounts that
// image's layers and later reads them.
package criauth

import (
	"container/list"
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"sync"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/strata-oci/strata/internal/remote"
)

// maxEntries bounds the credentials kept (the least recently pulled go).
const maxEntries = 1024

// Keychain holds the credentials of the images pulled through the proxy,
// by repository, and for each registry those of its latest pull. It is
// safe for concurrent use.
type Keychain struct {
	mu     sync.Mutex
	byRepo map[string]*list.Element // "registry/name" → entry
	lru    *list.List               // front: latest pull
	latest map[string]string        // registry → "registry/name" of its latest pull
}

type entry struct {
	repo string
	cred remote.Credential
}

// NewKeychain returns an empty keychain.
func NewKeychain() *Keychain {
	return &Keychain{byRepo: map[string]*list.Element{}, lru: list.New(), latest: map[string]string{}}
}

// Record keeps the credentials a PullImage request carries for image.
// Requests without credentials, or with an image reference that does not
// parse, change nothing.
func (k *Keychain) Record(image string, auth *runtime.AuthConfig) error {
	cred, ok, err := credentialOf(auth)
	if err != nil || !ok {
		return err
	}
	ref, err := remote.ParseReference(image)
	if err != nil {
		return nil
	}
	repo := ref.Repository.String()
	k.mu.Lock()
	defer k.mu.Unlock()
	if el, ok := k.byRepo[repo]; ok {
		el.Value.(*entry).cred = cred
		k.lru.MoveToFront(el)
	} else {
		k.byRepo[repo] = k.lru.PushFront(&entry{repo: repo, cred: cred})
	}
	k.latest[ref.Registry] = repo
	for k.lru.Len() > maxEntries {
		el := k.lru.Back()
		e := el.Value.(*entry)
		k.lru.Remove(el)
		delete(k.byRepo, e.repo)
		reg, _, _ := strings.Cut(e.repo, "/")
		if k.latest[reg] == e.repo {
			delete(k.latest, reg)
		}
	}
	return nil
}

// credentialOf turns a CRI AuthConfig into a credential; ok is false when
// it holds none.
func credentialOf(a *runtime.AuthConfig) (remote.Credential, bool, error) {
	if a == nil {
		return remote.Credential{}, false, nil
	}
	c := remote.Credential{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken}
	if a.Auth != "" && c.Username == "" && c.Password == "" {
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return remote.Credential{}, false, fmt.Errorf("pull credentials: auth is not base64")
		}
		user, pass, ok := strings.Cut(string(b), ":")
		if !ok {
			return remote.Credential{}, false, fmt.Errorf("pull credentials: auth is not user:password")
		}
		c.Username, c.Password = user, pass
	}
	if a.RegistryToken != "" && c.IdentityToken == "" && c.Password == "" {
		// A bearer token for the registry itself: presented as the
		// identity token, the token flow's refresh_token.
		c.IdentityToken = a.RegistryToken
	}
	return c, c.Username != "" || c.Password != "" || c.IdentityToken != "", nil
}

// lookup returns the credentials for a request to registry made for image
// (may be ""): those pulled with that image's repository, else those of
// the registry's latest pull.
func (k *Keychain) lookup(registry, image string) (remote.Credential, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if image != "" {
		if ref, err := remote.ParseReference(image); err == nil && ref.Registry == registry {
			if el, ok := k.byRepo[ref.Repository.String()]; ok {
				return el.Value.(*entry).cred, true
			}
		}
	}
	if repo, ok := k.latest[registry]; ok {
		if el, ok := k.byRepo[repo]; ok {
			return el.Value.(*entry).cred, true
		}
	}
	return remote.Credential{}, false
}

// Credentials returns a CredentialFunc that answers with the pulled
// credentials (the image of the request's context, remote.WithImageRef,
// first), else asks next (the Docker config, for instance).
func (k *Keychain) Credentials(next remote.CredentialFunc) remote.CredentialFunc {
	return func(ctx context.Context, registry string) (remote.Credential, error) {
		if c, ok := k.lookup(registry, remote.ImageRefFrom(ctx)); ok {
			return c, nil
		}
		if next == nil {
			return remote.Credential{}, nil
		}
		return next(ctx, registry)
	}
}
