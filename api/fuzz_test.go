package api_test

import (
	"encoding/json"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
)

// FuzzArtifacts parses arbitrary bytes as the expansion and profile
// artifacts a node finds among an image's referrers (a registry that is
// not strata's, anyone with push rights wrote them), and as profile and
// mount-descriptor JSON. Oracles: no panic; what parses names the subject
// asked and well-formed digests.
//
//	go test -run '^$' -fuzz '^FuzzArtifacts$' -fuzztime 60s ./api/
func FuzzArtifacts(f *testing.F) {
	subject := digest.FromString("manifest")
	d := digest.FromString("x")
	sd := `{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + subject.String() + `","size":10}`
	f.Add([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.strata.expansion.v1","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.strata.layer.index.v1","digest":"` + d.String() + `","size":1,"annotations":{"org.strata.layer":"` + d.String() + `"}}],"subject":` + sd + `}`))
	f.Add([]byte(`{"schemaVersion":2,"artifactType":"application/vnd.strata.profile.v1","layers":[{"mediaType":"application/vnd.strata.profile.v1+json","digest":"` + d.String() + `","size":-1}],"subject":` + sd + `}`))
	f.Add([]byte(`{"version":1,"layers":[{"layer":"` + d.String() + `","frames":[1,2],"ranges":[[0,1]]}],"pack":{"spans":[[0,0,0]],"chunks":[{"size":1}]}}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		if exps, err := api.ParseExpansionArtifact(raw, subject); err == nil {
			for l, e := range exps {
				if l.Validate() != nil || e.Index.Digest.Validate() != nil || e.Data.Digest.Validate() != nil {
					t.Fatalf("expansion artifact parsed with malformed digests: %v %+v", l, e)
				}
			}
		}
		if p, pack, err := api.ParseProfileArtifact(raw, subject); err == nil {
			if p.Digest.Validate() != nil || (pack != nil && pack.Digest.Validate() != nil) {
				t.Fatalf("profile artifact parsed with malformed digests: %+v %+v", p, pack)
			}
		}
		var p api.Profile
		json.Unmarshal(raw, &p)
		var md api.MountDescriptor
		json.Unmarshal(raw, &md)
	})
}
