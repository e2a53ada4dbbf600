// Package s3store is the store.Driver of a bucket of an S3-compatible
// object store (AWS S3, MinIO, SeaweedFS, Ceph RGW, …): each file of the
// store's layout is the object of that key below the bucket's prefix.
//
//	s3://BUCKET/PREFIX/
//	  blobs/<alg>/<hex[0:2]>/<hex>         as on the filesystem (package store)
//	  repositories/…                       links, revisions, tags, referrers
//	  uploads/<id>/repo                    the repository of an upload session
//	  uploads/<id>/data.upload             an Append file in progress: its multipart
//	                                       upload (id, parts with their sizes and ETags),
//	                                       and the pieces of its tail
//	  uploads/<id>/data.tail-<n>           a piece: bytes after the parts (fewer than a
//	                                       part in all), as one writer left them
//	  uploads/<id>/data                    the file, once committed
//	  uploads/<id>/hashstate               the session's sha256 state (package store)
//
// Objects appear whole or not at all, so Put is one PUT and Create is a
// multipart upload completed by Commit (one PUT when it is smaller than a
// part). Files that grow across requests and processes (upload sessions:
// Append) are multipart uploads whose state is kept as the small objects
// above: the bytes that do not fill a part yet wait in pieces of the tail,
// and about one part is in memory per writer (two for a moment, when
// pieces join the bytes of a request in a part). No blob is ever whole in
// memory or on a local disk.
//
// What an object store has not: directories (a prefix exists while an
// object is below it), renames (Move is a server-side copy and a delete),
// modification times that can be set (Touch does nothing: an object's
// time is when it was written) and locks (a session is written by one
// process at a time: the registry's, which holds its lock in memory;
// replicas need more, see docs/deployment.md).
package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"path"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"

	"github.com/strata-oci/strata/internal/store"
)

// Options name a bucket and how to reach it. Credentials come from the
// AWS SDK's default chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
// (and AWS_SESSION_TOKEN), AWS_PROFILE with the shared config and
// credentials files, web identity, the instance or container role.
type Options struct {
	Bucket string
	// Prefix is where the store's keys start in the bucket ("" the
	// bucket's root).
	Prefix string
	// Endpoint is the object store's URL (https://minio.example:9000),
	// "" for AWS S3 (or AWS_ENDPOINT_URL_S3).
	Endpoint string
	// Region, "" for the SDK's (AWS_REGION, the shared config), else
	// us-east-1.
	Region string
	// PathStyle addresses the bucket in the path (ENDPOINT/BUCKET/KEY)
	// rather than the host name (BUCKET.ENDPOINT/KEY): most stores other
	// than AWS need it.
	PathStyle bool
	// PartSize is the size of the parts of multipart uploads, the memory
	// one writer holds (DefaultPartSize; at least MinPartSize).
	PartSize int64
	// URLExpiry is how long a presigned URL of a blob (URL) is valid
	// (DefaultURLExpiry).
	URLExpiry time.Duration
	// HTTPClient, if set, makes the requests.
	HTTPClient *http.Client
}

const (
	// DefaultPartSize: 16 MiB parts hold blobs up to 160 GB (10 000 parts).
	DefaultPartSize = 16 << 20
	// MinPartSize is S3's least size of a part that is not the last.
	MinPartSize = 5 << 20
	// DefaultURLExpiry is how long a presigned GET is valid.
	DefaultURLExpiry = 20 * time.Minute
	// maxCopy is the largest object CopyObject copies; larger ones are
	// copied in parts.
	maxCopy = 5 << 30
	// copyPart is the size of the parts of a copy in parts.
	copyPart = 512 << 20
)

// CacheControl is what a blob's presigned GET answers with: a blob is
// named by its digest, its content never changes.
const CacheControl = "max-age=31536000, immutable"

// ParseURL parses a storage URL s3://BUCKET[/PREFIX].
func ParseURL(s string) (bucket, prefix string, err error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "s3" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", "", fmt.Errorf("storage %q: want s3://BUCKET[/PREFIX]", s)
	}
	return u.Host, strings.Trim(u.Path, "/"), nil
}

// Driver is a store.Driver on a bucket.
type Driver struct {
	client  *s3.Client
	presign *s3.PresignClient
	opts    Options
}

var _ store.Driver = (*Driver)(nil)

// Open connects to the bucket and checks that it is there and that the
// credentials may use it (HeadBucket): a wrong name, endpoint or key is
// an error now, not at the first push.
func Open(ctx context.Context, opts Options) (*Driver, error) {
	if opts.Bucket == "" {
		return nil, errors.New("s3: no bucket")
	}
	if opts.PartSize == 0 {
		opts.PartSize = DefaultPartSize
	}
	if opts.PartSize < MinPartSize {
		return nil, fmt.Errorf("s3: part size %d is under S3's least, %d", opts.PartSize, MinPartSize)
	}
	if opts.URLExpiry == 0 {
		opts.URLExpiry = DefaultURLExpiry
	}
	opts.Prefix = strings.Trim(opts.Prefix, "/")
	var load []func(*config.LoadOptions) error
	if opts.Region != "" {
		load = append(load, config.WithRegion(opts.Region))
	}
	if opts.HTTPClient != nil {
		load = append(load, config.WithHTTPClient(opts.HTTPClient))
	}
	cfg, err := config.LoadDefaultConfig(ctx, load...)
	if err != nil {
		return nil, fmt.Errorf("s3: aws configuration: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	// Checksums only where S3 requires them: the stores compatible with
	// S3 do not all take the SDK's default trailing checksums.
	cfg.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
	cfg.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	client := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(opts.Endpoint)
		}
		o.UsePathStyle = opts.PathStyle
	})
	d := &Driver{client: client, presign: s3.NewPresignClient(client), opts: opts}
	if _, err := client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(opts.Bucket)}); err != nil {
		where := "s3://" + opts.Bucket
		if opts.Endpoint != "" {
			where += " at " + opts.Endpoint
		}
		switch status(err) {
		case http.StatusNotFound:
			return nil, fmt.Errorf("%s: no such bucket", where)
		case http.StatusForbidden, http.StatusUnauthorized:
			return nil, fmt.Errorf("%s: access denied to the credentials of the AWS environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)", where)
		case http.StatusMovedPermanently:
			return nil, fmt.Errorf("%s: the bucket is in another region than %s (--s3-region)", where, cfg.Region)
		}
		var ne *net.OpError
		if errors.As(err, &ne) {
			return nil, fmt.Errorf("%s: cannot reach the object store: %w", where, ne)
		}
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	return d, nil
}

// String names the bucket and prefix as a storage URL.
func (d *Driver) String() string {
	return "s3://" + path.Join(d.opts.Bucket, d.opts.Prefix)
}

// key is the object key of store key k.
func (d *Driver) key(k string) string {
	if d.opts.Prefix == "" {
		return k
	}
	return d.opts.Prefix + "/" + k
}

// storeKey is the store key of object key k.
func (d *Driver) storeKey(k string) string {
	if d.opts.Prefix == "" {
		return k
	}
	return strings.TrimPrefix(k, d.opts.Prefix+"/")
}

// status is the HTTP status of an S3 error, 0 if it has none.
func status(err error) int {
	var re interface{ HTTPStatusCode() int }
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

func notFound(err error) bool {
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nsk) || errors.As(err, &nf) {
		return true
	}
	var ae smithy.APIError
	if errors.As(err, &ae) && (ae.ErrorCode() == "NoSuchKey" || ae.ErrorCode() == "NotFound") {
		return true
	}
	return status(err) == http.StatusNotFound
}

// fail converts an S3 error: a missing key is fs.ErrNotExist, a canceled
// request its context's error, anything else store.ErrUnavailable (the
// registry answers 503 and the client tries again).
func fail(op, key string, err error) error {
	switch {
	case notFound(err):
		return fmt.Errorf("s3 %s %s: %w", op, key, fs.ErrNotExist)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("s3 %s %s: %w", op, key, err)
	}
	return fmt.Errorf("s3 %s %s: %w: %w", op, key, store.ErrUnavailable, err)
}

// Get implements store.Driver.
func (d *Driver) Get(ctx context.Context, key string) ([]byte, error) {
	out, err := d.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &d.opts.Bucket, Key: aws.String(d.key(key))})
	if err != nil {
		return nil, fail("get", key, err)
	}
	defer out.Body.Close()
	b, err := io.ReadAll(out.Body)
	if err != nil {
		return nil, fail("get", key, err)
	}
	return b, nil
}

// Put implements store.Driver: one PUT.
func (d *Driver) Put(ctx context.Context, key string, b []byte) error {
	_, err := d.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket: &d.opts.Bucket, Key: aws.String(d.key(key)),
		Body: bytes.NewReader(b), ContentLength: aws.Int64(int64(len(b))),
	})
	if err != nil {
		return fail("put", key, err)
	}
	return nil
}

func (d *Driver) head(ctx context.Context, key string) (*s3.HeadObjectOutput, error) {
	out, err := d.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &d.opts.Bucket, Key: aws.String(d.key(key))})
	if err != nil {
		return nil, fail("head", key, err)
	}
	return out, nil
}

// Open implements store.Driver: the object's size is read now (a missing
// key or an unreachable store fail here, before anything is answered);
// its bytes are read by ranged GETs.
func (d *Driver) Open(ctx context.Context, key string) (store.Reader, error) {
	h, err := d.head(ctx, key)
	if err != nil {
		return nil, err
	}
	return &reader{ctx: ctx, d: d, key: key, size: aws.ToInt64(h.ContentLength)}, nil
}

// Stat implements store.Driver. A key without an object is a directory if
// objects are below it; its time is the newest of the first thousand.
func (d *Driver) Stat(ctx context.Context, key string) (store.FileInfo, error) {
	h, err := d.head(ctx, key)
	if err == nil {
		return store.FileInfo{Key: key, Size: aws.ToInt64(h.ContentLength), ModTime: aws.ToTime(h.LastModified)}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return store.FileInfo{}, err
	}
	out, lerr := d.client.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &d.opts.Bucket, Prefix: aws.String(d.key(key) + "/")})
	if lerr != nil {
		return store.FileInfo{}, fail("list", key, lerr)
	}
	if len(out.Contents) == 0 {
		return store.FileInfo{}, err
	}
	fi := store.FileInfo{Key: key, Dir: true}
	for _, o := range out.Contents {
		if t := aws.ToTime(o.LastModified); t.After(fi.ModTime) {
			fi.ModTime = t
		}
	}
	return fi, nil
}

// List implements store.Driver.
func (d *Driver) List(ctx context.Context, prefix string, recursive bool) ([]store.FileInfo, error) {
	in := &s3.ListObjectsV2Input{Bucket: &d.opts.Bucket, Prefix: aws.String(d.key(prefix) + "/")}
	if !recursive {
		in.Delimiter = aws.String("/")
	}
	var out []store.FileInfo
	p := s3.NewListObjectsV2Paginator(d.client, in)
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fail("list", prefix, err)
		}
		for _, o := range page.Contents {
			k := aws.ToString(o.Key)
			if strings.HasSuffix(k, "/") {
				continue // a "directory" object some tools make
			}
			out = append(out, store.FileInfo{Key: d.storeKey(k), Size: aws.ToInt64(o.Size), ModTime: aws.ToTime(o.LastModified)})
		}
		for _, cp := range page.CommonPrefixes {
			out = append(out, store.FileInfo{Key: d.storeKey(strings.TrimSuffix(aws.ToString(cp.Prefix), "/")), Dir: true})
		}
	}
	return out, nil
}

// Delete implements store.Driver. Deleting a directory also aborts the
// multipart uploads of the Append files in it.
func (d *Driver) Delete(ctx context.Context, key string) error {
	_, err := d.head(ctx, key)
	if err == nil {
		return d.deleteObject(ctx, key)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	files, lerr := d.List(ctx, key, true)
	if lerr != nil {
		return lerr
	}
	if len(files) == 0 {
		return err
	}
	for _, f := range files {
		if strings.HasSuffix(f.Key, stateSuffix) {
			d.abortAppend(ctx, strings.TrimSuffix(f.Key, stateSuffix))
		}
	}
	for _, f := range files {
		if err := d.deleteObject(ctx, f.Key); err != nil {
			return err
		}
	}
	return nil
}

func (d *Driver) deleteObject(ctx context.Context, key string) error {
	if _, err := d.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &d.opts.Bucket, Key: aws.String(d.key(key))}); err != nil {
		return fail("delete", key, err)
	}
	return nil
}

// copySource is the x-amz-copy-source of key.
func (d *Driver) copySource(key string) *string {
	return aws.String(url.PathEscape(d.opts.Bucket) + "/" + escapeKey(d.key(key)))
}

func escapeKey(k string) string {
	parts := strings.Split(k, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return strings.Join(parts, "/")
}

// copy copies object from to to, server-side: one request up to 5 GiB,
// parts of 512 MiB above.
func (d *Driver) copy(ctx context.Context, from, to string, size int64) error {
	if size <= maxCopy {
		_, err := d.client.CopyObject(ctx, &s3.CopyObjectInput{
			Bucket: &d.opts.Bucket, Key: aws.String(d.key(to)), CopySource: d.copySource(from),
		})
		if err != nil {
			return fail("copy", from, err)
		}
		return nil
	}
	mu, err := d.client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &d.opts.Bucket, Key: aws.String(d.key(to))})
	if err != nil {
		return fail("copy", from, err)
	}
	var parts []types.CompletedPart
	for off, n := int64(0), int32(1); off < size; off, n = off+copyPart, n+1 {
		end := min(off+copyPart, size) - 1
		out, err := d.client.UploadPartCopy(ctx, &s3.UploadPartCopyInput{
			Bucket: &d.opts.Bucket, Key: aws.String(d.key(to)), UploadId: mu.UploadId, PartNumber: aws.Int32(n),
			CopySource: d.copySource(from), CopySourceRange: aws.String(fmt.Sprintf("bytes=%d-%d", off, end)),
		})
		if err != nil {
			d.abort(ctx, to, aws.ToString(mu.UploadId))
			return fail("copy", from, err)
		}
		parts = append(parts, types.CompletedPart{ETag: out.CopyPartResult.ETag, PartNumber: aws.Int32(n)})
	}
	_, err = d.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket: &d.opts.Bucket, Key: aws.String(d.key(to)), UploadId: mu.UploadId,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
	})
	if err != nil {
		d.abort(ctx, to, aws.ToString(mu.UploadId))
		return fail("copy", from, err)
	}
	return nil
}

// Move implements store.Driver: a server-side copy, then a delete.
func (d *Driver) Move(ctx context.Context, from, to string) error {
	h, err := d.head(ctx, from)
	if err != nil {
		return err
	}
	if err := d.copy(ctx, from, to, aws.ToInt64(h.ContentLength)); err != nil {
		return err
	}
	return d.deleteObject(ctx, from)
}

// Touch implements store.Driver, doing nothing: S3 gives an object a new
// modification time only when it is written again, and a copy of a blob
// onto itself (a server-side rewrite of all its bytes, up to 5 GiB in one
// request) on every HEAD of a push is too dear for what only garbage
// collection reads, which a registry on S3 does not have yet
// (docs/deployment.md). Modification times are the objects' write times.
func (d *Driver) Touch(ctx context.Context, key string) error {
	return nil
}

// URL returns a presigned GET of key, valid for Options.URLExpiry, whose
// answer carries CacheControl.
func (d *Driver) URL(ctx context.Context, key string) (string, error) {
	req, err := d.presign.PresignGetObject(ctx, &s3.GetObjectInput{
		Bucket: &d.opts.Bucket, Key: aws.String(d.key(key)), ResponseCacheControl: aws.String(CacheControl),
	}, s3.WithPresignExpires(d.opts.URLExpiry))
	if err != nil {
		return "", fail("presign", key, err)
	}
	return req.URL, nil
}

// URLExpiry is how long the URLs of URL are valid.
func (d *Driver) URLExpiry() time.Duration { return d.opts.URLExpiry }

func (d *Driver) abort(ctx context.Context, key, uploadID string) {
	d.client.AbortMultipartUpload(context.WithoutCancel(ctx), &s3.AbortMultipartUploadInput{
		Bucket: &d.opts.Bucket, Key: aws.String(d.key(key)), UploadId: aws.String(uploadID),
	})
}
