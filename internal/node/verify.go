package node

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// Background verification of lazy layers (Options.VerifyLayers).
//
// A lazy layer is served from an expansion the registry or an expansion
// referrer offers. Before it is mounted, its index is bound to the layer
// digest and diff ID the image names (saveIndex), and every frame read is
// verified against the index: but that the index describes the layer is
// the index's claim. A registry, or anyone who can push a referrer, can
// serve another file tree under the right claims.
//
// The expansion is deterministic, so the node checks the claim itself,
// once the layer is mounted and the node is quiet: it fetches the layer
// blob (in ranges, only while the node stays quiet: a start pauses it
// within a range), verifies it against the layer digest, expands it again
// with layerindex.Build (the data blob goes nowhere; its uncompressed
// stream is hashed) and compares: the same index digest is the same
// expansion. An index of the same tree whose frames were compressed
// otherwise (an older builder, another zstd encoder) does not have the
// same digest: then the entries and the frames' uncompressed layout must
// be the same, and the mounted data blob's frames, each verified against
// the mounted index, must decompress to the same stream.
//
// A layer that passes is recorded (layers/<d>/verified names the index
// verified) and not verified again. One that does not is refused: logged
// as an error, counted (strata_node_layer_verifications_total{result=
// "refused"}), recorded (layers/<d>/refused, with the reason), and the
// images that name it are marked (Image.Refused); its mount fails every
// open and read with EIO from then on (layerfs.FS.Refuse), and its next
// use pulls it whole, the fallback path, which checks its diff ID. The
// node never mounts a refused layer lazily again.
//
// Only one index version exists: a node mounts only indexes of
// layerindex.Version, which Build writes.

// Values of Options.VerifyLayers.
const (
	VerifyBackground = "background"
	VerifyOff        = "off"
)

const (
	// defaultVerifyQuiet is Options.VerifyQuiet's default: longer than
	// the completer's, a verification fetches whole layer blobs.
	defaultVerifyQuiet = 10 * time.Second
	// verifyChunk is the bytes of a layer blob one request fetches.
	verifyChunk = 1 << 20
	// verifyPoll is how often the node's activity is looked at while a
	// verification waits or runs.
	verifyPoll = 200 * time.Millisecond
	// verifyAttempts bounds the attempts at one layer per daemon life
	// (failed fetches; the next mount of the layer queues it again), and
	// verifyRetry is the wait after the first failure, doubled after each.
	verifyAttempts = 5
	verifyRetry    = time.Minute
)

// errRefused: a layer's expansion failed verification (layers/<d>/refused).
var errRefused = errors.New("its expansion failed verification")

// errBusy cancels a verification request when the node becomes busy.
var errBusy = errors.New("the node is busy")

// A verifyJob is a lazy layer to verify.
type verifyJob struct {
	layer    digest.Digest
	size     int64 // of the layer blob
	repo     remote.Repository
	index    digest.Digest // the index mounted
	ix       *layerindex.Index
	attempts int
	notAfter time.Time // not tried before (a retry)
}

// A verifier verifies lazy layers in the background, one at a time, when
// the node is quiet.
type verifier struct {
	m     *Manager
	quiet time.Duration

	busyAt   atomic.Int64 // Unix ns of the last activity
	busyMu   sync.Mutex
	busyCh   chan struct{} // closed and replaced by busy
	pollMu   sync.Mutex
	activity int64 // the counters seen last (poll), under pollMu

	mu      sync.Mutex
	queue   []*verifyJob
	queued  map[digest.Digest]bool // queued or being verified
	wake    chan struct{}
	changed chan struct{} // closed and replaced when the queue empties

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

func newVerifier(m *Manager, quiet time.Duration) *verifier {
	if quiet <= 0 {
		quiet = defaultVerifyQuiet
	}
	ctx, cancel := context.WithCancel(context.Background())
	v := &verifier{m: m, quiet: quiet, busyCh: make(chan struct{}), queued: map[digest.Digest]bool{},
		wake: make(chan struct{}, 1), changed: make(chan struct{}), ctx: ctx, cancel: cancel, done: make(chan struct{})}
	v.busy()
	go v.run()
	return v
}

func (v *verifier) close() {
	v.cancel()
	<-v.done
}

// busy notes activity: verification waits until the node has been quiet
// for v.quiet, and a request of it under way is cancelled.
func (v *verifier) busy() {
	v.busyAt.Store(time.Now().UnixNano())
	v.busyMu.Lock()
	close(v.busyCh)
	v.busyCh = make(chan struct{})
	v.busyMu.Unlock()
}

func (v *verifier) busyChan() <-chan struct{} {
	v.busyMu.Lock()
	defer v.busyMu.Unlock()
	return v.busyCh
}

// poll notes activity the node's layers, background completion and
// fallback downloads show since it last looked: reads served, files
// opened, frames fetched.
func (v *verifier) poll() {
	m := v.m
	var n int64
	m.mu.Lock()
	for _, l := range m.layers {
		if l.fs != nil {
			st := l.fs.Stats()
			n += st.ServedReads + st.ServedOpens + st.PassthroughOpens + st.PageReads + st.DirListings + st.Requests + st.Materialized
		}
	}
	n += int64(len(m.downloads)) << 32
	m.mu.Unlock()
	if m.complete != nil {
		bg := m.complete.Stats()
		n += bg.Fetched + int64(bg.Pending)<<40
	}
	v.pollMu.Lock()
	changed := n != v.activity
	v.activity = n
	v.pollMu.Unlock()
	if changed {
		v.busy()
	}
}

// pending reports whether layers wait for verification.
func (v *verifier) pending() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.queued) > 0
}

// idle returns a channel closed once no layer waits for verification.
func (v *verifier) idle() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.queued) == 0 {
		return closedChan
	}
	return v.changed
}

var closedChan = func() chan struct{} { ch := make(chan struct{}); close(ch); return ch }()

// add queues job unless its layer is queued already.
func (v *verifier) add(job *verifyJob) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.queued[job.layer] || v.ctx.Err() != nil {
		return
	}
	v.queued[job.layer] = true
	v.queue = append(v.queue, job)
	select {
	case v.wake <- struct{}{}:
	default:
	}
}

func (v *verifier) run() {
	defer close(v.done)
	for {
		v.mu.Lock()
		var job *verifyJob
		var wait time.Duration = -1
		for i, j := range v.queue {
			if d := time.Until(j.notAfter); d > 0 {
				if wait < 0 || d < wait {
					wait = d
				}
				continue
			}
			job = j
			v.queue = append(v.queue[:i:i], v.queue[i+1:]...)
			break
		}
		v.mu.Unlock()
		if job == nil {
			var timer *time.Timer
			var fire <-chan time.Time
			if wait >= 0 {
				timer = time.NewTimer(wait)
				fire = timer.C
			}
			select {
			case <-v.wake:
			case <-fire:
			case <-v.ctx.Done():
			}
			if timer != nil {
				timer.Stop()
			}
			if v.ctx.Err() != nil {
				return
			}
			continue
		}
		again := v.do(job)
		v.mu.Lock()
		if again {
			v.queue = append(v.queue, job)
		} else {
			delete(v.queued, job.layer)
		}
		if len(v.queued) == 0 {
			close(v.changed)
			v.changed = make(chan struct{})
		}
		v.mu.Unlock()
		if v.ctx.Err() != nil {
			return
		}
	}
}

// do verifies job's layer and acts on the outcome; it reports whether the
// job is to be tried again later.
func (v *verifier) do(job *verifyJob) (again bool) {
	m, log := v.m, v.m.log.With("layer", job.layer)
	if err := v.waitQuiet(v.ctx); err != nil {
		return false
	}
	// The node's activity is watched while the verification runs.
	ctx, cancel := context.WithCancel(v.ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(verifyPoll)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				v.poll()
			}
		}
	}()
	start := time.Now()
	log.Info("verifying a lazy layer against its blob")
	reason, err := v.verify(ctx, job)
	took := time.Since(start).Round(time.Millisecond)
	switch {
	case v.ctx.Err() != nil:
		return false
	case err == nil && reason == "":
		m.metrics.verified(verifyOK)
		if err := atomicfile.Write(filepath.Join(layerDir(m.root, job.layer), "verified"), []byte(job.index.String())); err != nil {
			log.Warn("recording a verified layer", "err", err)
		}
		log.Info("lazy layer verified: its expansion is the layer's", "index", job.index, "took", took)
		return false
	case err == nil:
		m.metrics.verified(verifyRefused)
		m.refuseLayer(job.layer, reason)
		return false
	}
	m.metrics.verified(verifyFailed)
	job.attempts++
	if job.attempts >= verifyAttempts {
		log.Warn("lazy layer not verified: giving up until it is mounted again", "attempts", job.attempts, "err", err)
		return false
	}
	job.notAfter = time.Now().Add(verifyRetry << (job.attempts - 1))
	log.Warn("lazy layer not verified: trying again later", "err", err, "retry_at", job.notAfter.Format(time.TimeOnly))
	return true
}

// waitQuiet returns once the node has been quiet for v.quiet.
func (v *verifier) waitQuiet(ctx context.Context) error {
	for {
		v.poll()
		idle := time.Since(time.Unix(0, v.busyAt.Load()))
		if idle >= v.quiet {
			return nil
		}
		t := time.NewTimer(min(v.quiet-idle, verifyPoll))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}

// readRange reads n bytes of blob d at off while the node is quiet: a
// request the node's activity interrupts is made again once it is quiet.
func (v *verifier) readRange(ctx context.Context, repo remote.Repository, d digest.Digest, off, n int64) ([]byte, error) {
	for {
		if err := v.waitQuiet(ctx); err != nil {
			return nil, err
		}
		qctx, cancel := context.WithCancelCause(ctx)
		busy := v.busyChan()
		go func() {
			select {
			case <-busy:
				cancel(errBusy)
			case <-qctx.Done():
			}
		}()
		b, err := v.m.client.ReadRange(qctx, repo, d, off, n)
		interrupted := errors.Is(context.Cause(qctx), errBusy)
		cancel(nil)
		if err == nil {
			v.m.metrics.verifyBytes.Add(n)
			return b, nil
		}
		if !interrupted || ctx.Err() != nil {
			return nil, err
		}
	}
}

// A quietBlob reads a blob of size bytes from the registry, a range at a
// time, only while the node is quiet (verifier.readRange), and hashes what
// it read.
type quietBlob struct {
	ctx  context.Context
	v    *verifier
	repo remote.Repository
	d    digest.Digest
	size int64
	off  int64
	buf  []byte
	h    hash.Hash
}

func newQuietBlob(ctx context.Context, v *verifier, repo remote.Repository, d digest.Digest, size int64) *quietBlob {
	return &quietBlob{ctx: ctx, v: v, repo: repo, d: d, size: size, h: sha256.New()}
}

// intact reads what is left of the blob and reports whether all of it
// hashes to its digest.
func (r *quietBlob) intact() (bool, error) {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return false, err
	}
	return digest.NewDigest(digest.SHA256, r.h) == r.d, nil
}

func (r *quietBlob) Read(p []byte) (int, error) {
	if len(r.buf) == 0 {
		if r.off >= r.size {
			return 0, io.EOF
		}
		n := min(int64(verifyChunk), r.size-r.off)
		b, err := r.v.readRange(r.ctx, r.repo, r.d, r.off, n)
		if err != nil {
			return 0, err
		}
		r.off += n
		r.buf = b
	}
	n := copy(p, r.buf)
	r.h.Write(p[:n])
	r.buf = r.buf[n:]
	return n, nil
}

// verify expands job's layer blob again and compares the expansion with
// the index mounted. It returns why they differ ("": they do not), or an
// error when the verification could not be made.
func (v *verifier) verify(ctx context.Context, job *verifyJob) (reason string, err error) {
	blob := newQuietBlob(ctx, v, job.repo, job.layer, job.size)
	// The data blob is not kept: its frames are decompressed as they are
	// written, and the uncompressed stream hashed (for sameData).
	stream := newStreamHasher()
	ix, err := layerindex.Build(ctx, blob, stream, layerindex.Options{MediaType: job.ix.MediaType})
	sum, serr := stream.close()
	switch {
	case ctx.Err() != nil:
		return "", ctx.Err()
	case errors.Is(err, layerindex.ErrInvalidLayer):
		// Refused only if the bytes are the layer's.
		if ok, rerr := blob.intact(); rerr != nil || !ok {
			return "", errors.Join(fmt.Errorf("%w: the registry's layer blob is not the layer", remote.ErrDigestMismatch), rerr)
		}
		return fmt.Sprintf("the layer blob does not expand: %v", err), nil
	case err != nil:
		return "", fmt.Errorf("expand the layer blob: %w", err)
	case serr != nil:
		return "", fmt.Errorf("expand the layer blob: data stream: %w", serr)
	case ix.Layer != job.layer:
		// The registry's ranges are not the layer's bytes.
		return "", fmt.Errorf("%w: the registry's layer blob hashes to %s", remote.ErrDigestMismatch, ix.Layer)
	case ix.DiffID != job.ix.DiffID:
		return fmt.Sprintf("the layer's diff ID is %s, its index says %s", ix.DiffID, job.ix.DiffID), nil
	}
	enc, err := ix.MarshalBinary()
	if err != nil {
		return "", err
	}
	if digest.FromBytes(enc) == job.index {
		return "", nil
	}
	if why := sameTree(job.ix, ix); why != "" {
		return why, nil
	}
	// The same tree and layout, compressed otherwise: the mounted frames
	// must hold the same bytes.
	v.m.log.Info("the layer's index was compressed by another builder: comparing the data blob's frames", "layer", job.layer,
		"index", job.index, "expanded", digest.FromBytes(enc))
	same, err := v.sameData(ctx, job, sum)
	if err != nil || same {
		return "", err
	}
	return "its data blob's frames do not decompress to the layer's files", nil
}

// sameTree returns the first difference between the mounted index a and
// the expansion b of the layer, other than how frames are compressed: ""
// when a describes the same entries and lays them out alike in the same
// uncompressed stream.
func sameTree(a, b *layerindex.Index) string {
	switch {
	case len(a.Entries) != len(b.Entries):
		return fmt.Sprintf("the index lists %d entries, the layer has %d", len(a.Entries), len(b.Entries))
	case a.StreamSize != b.StreamSize || len(a.Frames) != len(b.Frames):
		return fmt.Sprintf("the index lays out %d bytes in %d frames, the layer %d in %d", a.StreamSize, len(a.Frames), b.StreamSize, len(b.Frames))
	}
	for i := range a.Entries {
		if !reflect.DeepEqual(a.Entries[i], b.Entries[i]) {
			return fmt.Sprintf("entry %d of the index is %q, not the layer's %q, or differs from it", i, a.Entries[i].Path, b.Entries[i].Path)
		}
	}
	for i := range a.Frames {
		if a.Frames[i].UOffset != b.Frames[i].UOffset || a.Frames[i].USize != b.Frames[i].USize {
			return fmt.Sprintf("frame %d of the index holds other bytes of the stream than the layer's", i)
		}
	}
	return ""
}

// sameData reports whether the frames of job's mounted data blob, each
// verified against the mounted index, decompress to the stream whose
// sha256 is want.
func (v *verifier) sameData(ctx context.Context, job *verifyJob, want []byte) (bool, error) {
	ix := job.ix
	r := newQuietBlob(ctx, v, job.repo, ix.Data, ix.DataSize)
	h := sha256.New()
	var buf []byte
	for i := range ix.Frames {
		f := &ix.Frames[i]
		if int64(cap(buf)) < f.CSize {
			buf = make([]byte, f.CSize)
		}
		buf = buf[:f.CSize]
		if _, err := io.ReadFull(r, buf); err != nil {
			return false, fmt.Errorf("data blob %s: frame %d: %w", ix.Data, i, err)
		}
		// Bytes that are not the frame's are the transfer's fault (tried
		// again); a frame that is but does not decode is the index's.
		if sum := sha256.Sum256(buf); digest.NewDigestFromBytes(digest.SHA256, sum[:]) != f.Digest {
			return false, fmt.Errorf("data blob %s: frame %d: %w", ix.Data, i, remote.ErrDigestMismatch)
		}
		out, err := ix.DecodeVerifiedFrame(i, buf)
		if err != nil {
			return false, nil
		}
		h.Write(out)
	}
	return string(h.Sum(nil)) == string(want), nil
}

// A streamHasher takes a data blob as Build writes it and hashes its
// uncompressed stream.
type streamHasher struct {
	pw   *io.PipeWriter
	h    hash.Hash
	done chan error
}

func newStreamHasher() *streamHasher {
	pr, pw := io.Pipe()
	s := &streamHasher{pw: pw, h: sha256.New(), done: make(chan error, 1)}
	go func() {
		dec, err := zstd.NewReader(pr, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(layerindex.MaxFrameSize),
			zstd.WithDecoderMaxMemory(layerindex.MaxFrameSize))
		if err == nil {
			_, err = io.Copy(s.h, dec)
			dec.Close()
		}
		pr.CloseWithError(err)
		s.done <- err
	}()
	return s
}

func (s *streamHasher) Write(p []byte) (int, error) { return s.pw.Write(p) }

// close ends the stream and returns its sha256.
func (s *streamHasher) close() ([]byte, error) {
	s.pw.Close()
	err := <-s.done
	return s.h.Sum(nil), err
}

// Outcomes of a verification (strata_node_layer_verifications_total).
const (
	verifyOK      = "verified"
	verifyRefused = "refused"
	verifyFailed  = "failed"
)

// queueVerify queues lazy layer l, just mounted from its saved index ix,
// for verification unless it was verified already or verification is off.
func (m *Manager) queueVerify(l *layer, ix *layerindex.Index) {
	if m.verify == nil {
		return
	}
	md, err := m.savedDescriptor(l.digest)
	if err != nil {
		return
	}
	if b, err := os.ReadFile(filepath.Join(layerDir(m.root, l.digest), "verified")); err == nil && strings.TrimSpace(string(b)) == md.Index.Digest.String() {
		return
	}
	m.verify.add(&verifyJob{layer: l.digest, size: l.size, repo: l.repo, index: md.Index.Digest, ix: ix})
}

// refused returns an error wrapping errRefused, with the reason, when
// layer d's expansion failed verification.
func (m *Manager) refused(d digest.Digest) error {
	b, err := os.ReadFile(filepath.Join(layerDir(m.root, d), "refused"))
	if err != nil {
		return nil
	}
	return fmt.Errorf("%w: %s", errRefused, strings.TrimSpace(string(b)))
}

// refuseLayer refuses layer d, whose expansion is not the layer's (see
// the comment at the top of this file).
func (m *Manager) refuseLayer(d digest.Digest, reason string) {
	m.log.Error("LAYER REFUSED: its expansion is not the layer's; reads of its mount fail from now on, and it is pulled whole when next used",
		"layer", d, "reason", reason)
	if err := atomicfile.Write(filepath.Join(layerDir(m.root, d), "refused"), []byte(reason+"\n")); err != nil {
		m.log.Error("recording a refused layer", "layer", d, "err", err)
	}
	m.mu.Lock()
	l := m.layers[d]
	if l != nil && l.fs != nil {
		// Mounted: its users keep it (reads fail) until they leave; the
		// next use mounts it anew, unpacked.
		delete(m.layers, d)
		m.retire(l)
		m.detached[l] = true
	} else {
		l = nil
	}
	m.mu.Unlock()
	if l != nil {
		l.fs.Refuse(fmt.Errorf("%w: %s", errRefused, reason))
	}
	m.markRefused(d, reason)
}
