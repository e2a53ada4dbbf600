package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	stratanode "github.com/strata-oci/strata/internal/node"
	"github.com/strata-oci/strata/internal/nodeapi"
	"github.com/strata-oci/strata/internal/remote"
)

// TestRunReferrers: an image in the CNCF distribution registry (no
// layer-mount API, no Referrers API) that `strata expand` has expanded
// starts lazily: the node finds the expansion through the referrers tag,
// says so, and fetches a fraction of the image; its node stores the
// start-up profile it recorded as a profile artifact, and a start on a
// fresh node uses it.
func TestRunReferrers(t *testing.T) {
	requireRun(t)
	layout, _, _ := debianPython(t)
	addr := startDistribution(t)
	ref := addr + "/debian/python:latest"
	pushLayout(t, layout, "latest", ref)

	out, errOut, code := strataNoRoot(t, "expand", "--plain-http", ref)
	if code != 0 {
		t.Fatalf("strata expand: exit %d\nstdout: %s\nstderr: %s", code, out, tail(errOut, 3000))
	}
	t.Logf("strata expand: %s", strings.TrimSpace(out))

	root := nodeRoot(t)
	out, errOut, code = strataCode(t, root, "run", "--rm", "--plain-http", ref, "python3", "-c", `print("hello")`)
	if code != 0 || out != "hello\n" {
		t.Fatalf("run: code %d stdout %q stderr %s", code, out, errOut)
	}
	if !strings.Contains(errOut, "lazy: expansion referrers") {
		t.Fatalf("stderr does not say the expansion referrers were used: %s", errOut)
	}
	fetched, total := dfTotals(t, root)
	t.Logf("fetched %d of %d bytes of expanded data", fetched, total)
	if fetched <= 0 || fetched*2 > total {
		t.Errorf("fetched %d of %d bytes: not lazy\n%s", fetched, total, strata(t, root, "df"))
	}

	// The profile artifact: stored when the container's lease ended.
	r, err := remote.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	c := remote.New(remote.Options{Hosts: remote.PlainHosts(remote.IsLoopback)})
	ctx := context.Background()
	img, err := c.Resolve(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		p, err := c.ProfileReferrer(ctx, r.Repository, img.Digest)
		if err == nil && len(p.Layers) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no start-up profile artifact: %v", err)
		}
	}
	root2 := nodeRoot(t)
	if out, errOut, code := strataCode(t, root2, "run", "--rm", "--plain-http", ref, "python3", "-c", `print("hello")`); code != 0 || out != "hello\n" {
		t.Fatalf("profiled run: code %d stdout %q stderr %s", code, out, errOut)
	}
	dc, err := nodeapi.Dial(ctx, root2, nil)
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := dc.Images(ctx)
	if err != nil || len(imgs) != 1 || imgs[0].Profile == nil {
		t.Errorf("the second node's image has no start-up profile: %+v, %v", imgs, err)
	}
}

// dfTotals sums the fetched and total bytes of the lazy layers of the
// node on root.
func dfTotals(t *testing.T, root string) (fetched, total int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := nodeapi.Dial(ctx, root, nil)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.DF(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range r.Layers {
		if l.Mode == stratanode.ModeLazy {
			fetched += l.Fetched
			total += l.Total
		}
	}
	return fetched, total
}
