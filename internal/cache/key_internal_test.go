package cache

import (
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestKeyOf(t *testing.T) {
	good := digest.FromString("x")
	if k, err := keyOf(kindFile, good); err != nil || k.hex != good.Encoded() {
		t.Errorf("keyOf(%s) = %v, %v", good, k, err)
	}
	for _, d := range []digest.Digest{
		"", "sha256", "sha256:", digest.Digest("sha256:" + strings.ToUpper(good.Encoded())),
		digest.Digest("sha256:" + good.Encoded()[:63]), digest.Digest("sha256:" + good.Encoded() + "0"),
		digest.Digest("sha256:../" + good.Encoded()[3:]), digest.Digest("sha512:" + good.Encoded() + good.Encoded()),
	} {
		if _, err := keyOf(kindFile, d); err == nil {
			t.Errorf("keyOf(%q) accepted", d)
		}
	}
}
