package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/bench/report"
	"github.com/strata-oci/strata/internal/ocilayout"
)

// strataNewVersion measures the first start, on a fresh node, of a new
// version of im that nobody has run: im's layers with one more small layer
// on top (an application's new release over unchanged base layers),
// pushed as its own tag just before (untimed). The registry has no profile
// of it; it answers with im's (derived, api.Profile.Derived), recorded
// before the timed runs. Default --startup-profiles auto, as a user runs.
func (e *env) strataNewVersion(ctx context.Context, im *image, id string) report.Sample {
	if im.profileErr != nil {
		return report.Sample{Error: "no start-up profile of the previous version: " + im.profileErr.Error()}
	}
	tag := "v2-" + id
	if err := e.pushNewVersion(ctx, im, tag); err != nil {
		return report.Sample{Error: "pushing the new version: " + err.Error()}
	}
	root := filepath.Join(e.disk, "newversion-"+id)
	defer e.removeNode(root)
	s, _ := e.strataRunTagOut(ctx, root, e.strataProxy.Addr(), im, tag, "--startup-profiles", "auto")
	return s
}

// pushNewVersion pushes tag to im's repository in strata's registry: im's
// latest with one small layer added on top, and waits for that layer's
// expansion.
func (e *env) pushNewVersion(ctx context.Context, im *image, tag string) error {
	base := "http://" + e.strataProxy.Addr() + "/v2/" + im.repo()
	do := func(method, url, contentType string, body []byte, want int) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		req.Header.Set("Accept", ocispec.MediaTypeImageManifest)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != want {
			err = fmt.Errorf("%s %s: %s %s", method, url, resp.Status, b)
		}
		return b, err
	}
	mb, err := do("GET", base+"/manifests/latest", "", nil, http.StatusOK)
	if err != nil {
		return err
	}
	var man ocispec.Manifest
	if err := json.Unmarshal(mb, &man); err != nil {
		return err
	}
	cb, err := do("GET", base+"/blobs/"+man.Config.Digest.String(), "", nil, http.StatusOK)
	if err != nil {
		return err
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(cb, &cfg); err != nil {
		return err
	}
	tr, err := ocilayout.Tar([]ocilayout.Entry{{Name: "strata-bench/", Type: '5'}, {Name: "strata-bench/version", Content: []byte(tag + "\n")}})
	if err != nil {
		return err
	}
	l := ocilayout.GzipLayer(tr)
	push := func(b []byte) (digest.Digest, error) {
		d := digest.FromBytes(b)
		_, err := do("POST", base+"/blobs/uploads/?digest="+d.String(), "application/octet-stream", b, http.StatusCreated)
		return d, err
	}
	ld, err := push(l.Blob)
	if err != nil {
		return err
	}
	cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
	cfg.History = nil
	cb, _ = json.Marshal(cfg)
	cd, err := push(cb)
	if err != nil {
		return err
	}
	man.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cd, Size: int64(len(cb))}
	man.Layers = append(man.Layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: ld, Size: int64(len(l.Blob))})
	man.MediaType = ocispec.MediaTypeImageManifest
	mb, _ = json.Marshal(man)
	if _, err := do("PUT", base+"/manifests/"+tag, ocispec.MediaTypeImageManifest, mb, http.StatusCreated); err != nil {
		return err
	}
	_, _, err = e.awaitExpansion(ctx, im.repo(), []digest.Digest{ld})
	return err
}
