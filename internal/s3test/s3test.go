// Package s3test runs a real S3-compatible object store for tests:
// SeaweedFS (`weed server` with its S3 gateway), from the test cache
// (/var/cache/strata-test/bin/seaweedfs-<version>/weed), built there from
// the Go module proxy the first time. A machine that has neither the
// binary skips the tests that need one (building it takes more than ten
// minutes: it is built only with STRATA_TEST_BUILD_SEAWEEDFS=1), and fails
// them when STRATA_TEST_S3=1.
package s3test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/strata-oci/strata/internal/testenv"
	"github.com/strata-oci/strata/internal/testimage"
)

// Version is the SeaweedFS module version the tests run (weed 4.53).
const Version = "v0.0.0-20261109003541-7506e5f91cd6"

const module = "github.com/seaweedfs/seaweedfs"

// Credentials of the server's one identity, and its region.
const (
	AccessKey = "strata-test"
	SecretKey = "strata-test-secret"
	Region    = "us-east-1"
)

// Binary returns the path of the weed binary in the test cache.
func Binary() string {
	return filepath.Join(testimage.DefaultCacheDir, "bin", "seaweedfs-"+Version, "weed")
}

var buildMu sync.Mutex

// weed returns the weed binary, building it into the test cache if it is
// not there: the module's go.mod has replace directives, so `go install
// pkg@version` refuses it; it is built in a copy of the module instead.
func weed(t testing.TB) string {
	t.Helper()
	bin := Binary()
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	buildMu.Lock()
	defer buildMu.Unlock()
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if os.Getenv("STRATA_TEST_BUILD_SEAWEEDFS") != "1" {
		// Building SeaweedFS takes over ten minutes on a small machine,
		// more than CI gives it: without the binary the S3 tests skip,
		// even in CI, unless STRATA_TEST_S3=1 requires them.
		reason := "no SeaweedFS at " + bin + " for the S3 tests (STRATA_TEST_BUILD_SEAWEEDFS=1 builds it there, 10+ minutes)"
		if os.Getenv("STRATA_TEST_S3") == "1" {
			t.Fatalf("STRATA_TEST_S3=1 but %s", reason)
		}
		t.Skip("skipping: " + reason)
	}
	if err := Build(context.Background(), bin); err != nil {
		testenv.Unavailable(t, "cannot build SeaweedFS: "+err.Error())
	}
	return bin
}

// Build builds weed of Version into bin.
func Build(ctx context.Context, bin string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "mod", "download", "-json", module+"@"+Version).Output()
	if err != nil {
		return fmt.Errorf("go mod download %s@%s: %w", module, Version, err)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		return fmt.Errorf("go mod download %s@%s: no directory", module, Version)
	}
	src, err := os.MkdirTemp("", "seaweedfs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(src)
	if out, err := exec.CommandContext(ctx, "cp", "-R", mod.Dir+"/.", src).CombinedOutput(); err != nil {
		return fmt.Errorf("copy %s: %w: %s", mod.Dir, err, out)
	}
	exec.Command("chmod", "-R", "u+w", src).Run()
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return err
	}
	tmp := bin + ".tmp"
	build := exec.CommandContext(ctx, "go", "build", "-o", tmp, "./weed")
	build.Dir = src
	build.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := build.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("go build ./weed: %w: %s", err, tail(string(out)))
	}
	return os.Rename(tmp, bin)
}

func tail(s string) string {
	if len(s) > 2000 {
		return s[len(s)-2000:]
	}
	return s
}

// Require skips (or fails, see the package doc) a test that needs a
// server when there is no weed binary, before it prepares anything else.
func Require(t testing.TB) {
	t.Helper()
	weed(t)
}

// Server is a running SeaweedFS with its S3 gateway.
type Server struct {
	// Endpoint is the S3 gateway's URL (http://127.0.0.1:PORT), path
	// style.
	Endpoint string
	Dir      string // its data
	client   *s3.Client
	stopOnce sync.Once
	stop     func()
}

// Stop stops the server now (an object store that stops answering).
func (s *Server) Stop() { s.stopOnce.Do(s.stop) }

// Start runs a SeaweedFS server for the test, stopped when it ends.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := weed(t)
	dir := t.TempDir()
	cfg, _ := json.Marshal(map[string]any{"identities": []any{map[string]any{
		"name":        "strata",
		"credentials": []any{map[string]string{"accessKey": AccessKey, "secretKey": SecretKey}},
		"actions":     []string{"Admin", "Read", "Write", "List", "Tagging"},
	}}})
	if err := os.WriteFile(filepath.Join(dir, "s3.json"), cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, 8)
	data := filepath.Join(dir, "data")
	os.MkdirAll(data, 0o755)
	args := []string{"server", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-master.port=" + ports[0], "-master.port.grpc=" + ports[1],
		"-volume.port=" + ports[2], "-volume.port.grpc=" + ports[3], "-volume.max=0",
		"-master.volumeSizeLimitMB=512",
		"-filer", "-filer.port=" + ports[4], "-filer.port.grpc=" + ports[5],
		"-s3", "-s3.port=" + ports[6], "-s3.port.grpc=" + ports[7], "-s3.port.iceberg=0", "-s3.port.lance=0",
		"-s3.config=" + filepath.Join(dir, "s3.json"),
	}
	cmd := exec.Command(bin, args...)
	logf, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s := &Server{Endpoint: "http://127.0.0.1:" + ports[6], Dir: dir}
	s.stop = func() {
		cmd.Process.Kill()
		<-done
	}
	t.Cleanup(func() {
		s.Stop()
		logf.Close()
	})
	s.client = s3.New(s3.Options{
		Region: Region, BaseEndpoint: aws.String(s.Endpoint), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(AccessKey, SecretKey, ""),
	})
	// Ready when a bucket can be made and written to (the volume server
	// has joined the master).
	ctx := context.Background()
	deadline := time.Now().Add(90 * time.Second)
	probe := "ready-" + randHex()
	for {
		_, err := s.client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(probe)})
		if err == nil || strings.Contains(err.Error(), "BucketAlreadyOwnedByYou") || strings.Contains(err.Error(), "BucketAlreadyExists") {
			_, err = s.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(probe), Key: aws.String("probe"), Body: strings.NewReader("ok")})
			if err == nil {
				break
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("weed server exited: %s", tail(string(b)))
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("SeaweedFS not ready after 90 s: %v\n%s", err, tail(string(b)))
		}
		time.Sleep(200 * time.Millisecond)
	}
	return s
}

// Bucket makes a new bucket and returns its name.
func (s *Server) Bucket(t testing.TB) string {
	t.Helper()
	name := "strata-" + randHex()
	ctx := context.Background()
	if _, err := s.client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
	// SeaweedFS grows the volumes of a bucket at its first write, which
	// takes seconds: not what a test should measure.
	if _, err := s.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(name), Key: aws.String("warm"), Body: strings.NewReader("warm")}); err != nil {
		t.Fatalf("write to bucket %s: %v", name, err)
	}
	s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(name), Key: aws.String("warm")})
	return name
}

// Client is an S3 client of the server, with its credentials.
func (s *Server) Client() *s3.Client { return s.client }

// Env is the environment that gives a process (the AWS SDK's default
// chain) the server's credentials and region.
func (s *Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + AccessKey, "AWS_SECRET_ACCESS_KEY=" + SecretKey, "AWS_REGION=" + Region,
		"AWS_EC2_METADATA_DISABLED=true"}
}

// SetEnv sets Env in the test's own environment (t.Setenv: not in
// parallel tests).
func (s *Server) SetEnv(t testing.TB) {
	t.Helper()
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

func randHex() string {
	var b [6]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// freePorts returns n ports free now, distinct.
func freePorts(t testing.TB, n int) []string {
	t.Helper()
	var lns []net.Listener
	var ports []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		ports = append(ports, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	for _, ln := range lns {
		ln.Close()
	}
	return ports
}
