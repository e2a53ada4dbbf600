package integration

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/strata-oci/strata/internal/ocilayout"
	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/testimage"
)

// pythonImage is Debian bookworm (minbase) with python3 as one gzip layer
// in an OCI layout, built once per test binary.
var pythonImage struct {
	once   sync.Once
	layout string // OCI layout dir, tag "latest"
	rootfs string // the root filesystem the layer was made from
	size   int64  // compressed layer size
	err    error
}

func debianPython(t *testing.T) (layout, rootfs string, layerSize int64) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "debootstrap", "tar")
	pythonImage.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		rootfs, err := testimage.Debian(ctx, testimage.DefaultCacheDir, "bookworm", "python3")
		if err != nil {
			pythonImage.err = err
			return
		}
		var tarBuf bytes.Buffer
		if err := testimage.Tar(ctx, rootfs, &tarBuf); err != nil {
			pythonImage.err = err
			return
		}
		layer := ocilayout.GzipLayer(tarBuf.Bytes())
		dir, err := os.MkdirTemp("", "strata-python-image-")
		if err != nil {
			pythonImage.err = err
			return
		}
		_, err = ocilayout.Write(filepath.Join(dir, "oci"), "latest", ocilayout.Image{
			Layers: []ocilayout.Layer{layer},
			Config: ocispec.ImageConfig{
				Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
				Cmd: []string{"python3"},
			},
		})
		pythonImage.layout, pythonImage.rootfs, pythonImage.size, pythonImage.err = filepath.Join(dir, "oci"), rootfs, int64(len(layer.Blob)), err
	})
	if pythonImage.err != nil {
		testenv.Unavailable(t, "cannot build the Debian+python3 image: "+pythonImage.err.Error())
	}
	return pythonImage.layout, pythonImage.rootfs, pythonImage.size
}

// pushLayout copies an OCI layout's tag into the registry with skopeo.
func pushLayout(t *testing.T, layout, tag, dest string) {
	t.Helper()
	testenv.RequireTool(t, "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	run(t, ctx, "skopeo", "copy", "-q", "--dest-tls-verify=false", "oci:"+layout+":"+tag, "docker://"+dest)
}
