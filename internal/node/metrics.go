package node

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/remote"
)

// The node's metrics (strata_node_*, listed in docs/metrics.md): what the
// node fetched from registries, how long reads waited for it, the cache,
// background completion, fallback pulls, mounts and leases. Most are read
// at scrape time from the counters the node keeps anyway, the ones `strata
// df` shows (the layers' file systems, the cache, the completer, the
// leases); only read misses, fallbacks and fallback downloads are counted
// as they happen. Every label takes its values from a small fixed set: no
// layer digest, image, repository or registry, which would make series
// without bound over a node's life (`strata df` has the figures per layer).
type metrics struct {
	readMiss  prometheus.Histogram
	fallbacks *prometheus.CounterVec
	// verifications counts background verifications of lazy layers
	// (verify.go) by outcome.
	verifications *prometheus.CounterVec
	// layerBytes counts the layer blobs downloaded by fallback pulls;
	// verifyBytes the layer and data blobs fetched by verifications.
	layerBytes  atomic.Int64
	verifyBytes atomic.Int64
	// retired sums the counters of the file systems of layers no longer
	// mounted, so that counters do not fall when a layer goes. Guarded by
	// Manager.mu, with the layers.
	retired layerfs.Stats
}

// Why a pull, or for the snapshotter a layer (MountLayer), fell back to
// downloading layers: the values of strata_node_fallbacks_total's reason.
const (
	// the registry offers no layer mounts, and no expansion referrer
	// was looked for (MountLayer without the image's manifest)
	fallbackNoLayerMounts = "no_layer_mounts"
	// the registry offers no layer mounts and the image has no
	// expansion referrer (or it does not list the layer)
	fallbackNoReferrer = "no_expansion_referrer"
	// looking for an expansion referrer failed
	fallbackReferrersFailed = "referrers_failed"
	// the registry cannot expand a layer (422)
	fallbackRefused = "expansion_refused"
	// a layer's expansion is not there (404)
	fallbackMissing = "expansion_missing"
	// a layer was still being expanded when the node stopped waiting
	fallbackExpanding = "expanding"
	// an expansion was refused for not being the layer's
	fallbackNotBound = "not_bound"
)

var fallbackReasons = []string{fallbackNoLayerMounts, fallbackNoReferrer, fallbackReferrersFailed,
	fallbackRefused, fallbackMissing, fallbackExpanding, fallbackNotBound}

func newMetrics() *metrics {
	mt := &metrics{
		readMiss: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "strata_node_read_miss_seconds",
			Help: "Time reads of lazy layers waited for frames that were neither in memory nor in the cache.",
			// 1 ms to 33 s: a frame from a nearby registry to a read at
			// the fetch timeout.
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_node_fallbacks_total",
			Help: "Pulls (for the snapshotter: layers) that fell back to downloading whole layers, by reason.",
		}, []string{"reason"}),
	}
	for _, r := range fallbackReasons {
		mt.fallbacks.WithLabelValues(r)
	}
	mt.verifications = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "strata_node_layer_verifications_total",
		Help: "Background verifications of lazy layers against their layer blobs, by result: verified, refused (the expansion is not the layer's: the layer is refused), failed (could not be made; tried again).",
	}, []string{"result"})
	for _, r := range []string{verifyOK, verifyRefused, verifyFailed} {
		mt.verifications.WithLabelValues(r)
	}
	return mt
}

// verified counts a verification with result (a verify* constant).
func (mt *metrics) verified(result string) { mt.verifications.WithLabelValues(result).Inc() }

// missed is layerfs.Options.ReadMiss.
func (mt *metrics) missed(wait time.Duration) { mt.readMiss.Observe(wait.Seconds()) }

// fallback counts a fallback for reason (a fallback* constant).
func (mt *metrics) fallback(reason string) { mt.fallbacks.WithLabelValues(reason).Inc() }

// layerFallback is the reason of a fallback for a layer whose expansion
// failed with err.
func layerFallback(err error) string {
	switch {
	case errors.Is(err, errNotBound):
		return fallbackNotBound
	case errors.Is(err, remote.ErrExpansionFailed):
		return fallbackRefused
	case errors.Is(err, remote.ErrExpanding):
		return fallbackExpanding
	default:
		return fallbackMissing
	}
}

// retire adds the counters of layer l's file system to the retired ones,
// as l is forgotten. m.mu is held.
func (m *Manager) retire(l *layer) {
	if l.fs != nil {
		m.metrics.retired = addStats(m.metrics.retired, l.fs.Stats())
	}
}

func addStats(a, b layerfs.Stats) layerfs.Stats {
	a.BytesFetched += b.BytesFetched
	a.FramesFetched += b.FramesFetched
	a.Requests += b.Requests
	a.SourceErrors += b.SourceErrors
	a.CorruptFrames += b.CorruptFrames
	a.CacheHits += b.CacheHits
	a.MemoryHits += b.MemoryHits
	a.Materialized += b.Materialized
	a.PassthroughOpens += b.PassthroughOpens
	a.ServedOpens += b.ServedOpens
	a.ServedReads += b.ServedReads
	a.ServedBytes += b.ServedBytes
	a.PageReads += b.PageReads
	a.Programs += b.Programs
	return a
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descFetched = desc("strata_node_fetched_bytes_total",
		"Bytes fetched from registries, by what fetched them: frames (lazy layers' reads, readahead and prefetches), pack (start-up packs), completion (background completion), layer (fallback downloads of whole layer blobs), verify (background verification of lazy layers).", "via")
	descRequests    = desc("strata_node_frame_requests_total", "Ranged requests for frames of lazy layers that succeeded.")
	descFetchErrors = desc("strata_node_frame_request_errors_total", "Ranged requests for frames of lazy layers that failed (errors, timeouts, short reads), each retry counted.")
	descCorrupt     = desc("strata_node_corrupt_frames_total", "Frames from registries that failed verification.")
	descFrames      = desc("strata_node_frames_total", "Frames lazy layers' reads and prefetches got, by where from: registry, cache, memory.", "from")
	descOpens       = desc("strata_node_opens_total", "Opens of files of lazy layers, by how their reads are served: passthrough (the kernel reads the cache file), served (by this process).", "how")
	descReads       = desc("strata_node_served_reads_total", "Reads of lazy layers' files that this process served.")
	descReadBytes   = desc("strata_node_served_read_bytes_total", "Bytes those reads returned.")

	descCacheBytes  = desc("strata_node_cache_bytes", "Bytes in the node's cache, by kind of item: frame, file.", "kind")
	descCacheItems  = desc("strata_node_cache_items", "Items in the node's cache, by kind: frame, file.", "kind")
	descCacheLimit  = desc("strata_node_cache_limit_bytes", "The bound on the cache's size (--cache-size; 0: none).")
	descCacheHits   = desc("strata_node_cache_hits_total", "Loads from the cache that found their item.")
	descCacheMisses = desc("strata_node_cache_misses_total", "Loads from the cache that did not (corrupt items included).")
	descEvictions   = desc("strata_node_cache_evictions_total", "Items evicted from the cache to make room.")
	descCacheBad    = desc("strata_node_cache_corrupt_total", "Cache items deleted for not matching their digest.")

	descCompleted = desc("strata_node_completion_files_total", "Files put whole into the cache in the background.")
	descCompBytes = desc("strata_node_completion_bytes_total", "Size of those files.")
	descCompFail  = desc("strata_node_completion_failures_total", "Background completions that failed.")
	descPending   = desc("strata_node_completion_pending", "Files queued for background completion, or being completed.")

	descLayers    = desc("strata_node_layers_mounted", "Layers mounted now (lingering ones included), by mode: lazy (FUSE), unpacked (fallback).", "mode")
	descLingering = desc("strata_node_layers_lingering", "Lazy layers mounted with no lease, until --layer-linger passes.")
	descUnions    = desc("strata_node_union_mounts", "Union mounts of images (strata mount).")
	descLeases    = desc("strata_node_leases", "Leases held, by kind: container, mount, other.", "kind")
)

var allDescs = []*prometheus.Desc{descFetched, descRequests, descFetchErrors, descCorrupt, descFrames, descOpens, descReads, descReadBytes,
	descCacheBytes, descCacheItems, descCacheLimit, descCacheHits, descCacheMisses, descEvictions, descCacheBad,
	descCompleted, descCompBytes, descCompFail, descPending, descLayers, descLingering, descUnions, descLeases}

// collector collects a Manager's metrics.
type collector struct{ m *Manager }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
	c.m.metrics.readMiss.Describe(ch)
	c.m.metrics.fallbacks.Describe(ch)
	c.m.metrics.verifications.Describe(ch)
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	m := c.m
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), labels...)
	}

	mounted := map[string]int64{ModeLazy: 0, ModeUnpacked: 0}
	leases := map[string]int64{"container": 0, "mount": 0, "other": 0}
	var lingering, unions int64
	m.mu.Lock()
	fs := m.metrics.retired
	for _, l := range m.layers {
		if l.fs != nil {
			fs = addStats(fs, l.fs.Stats())
		}
		if l.mode == "" {
			continue // being mounted
		}
		mounted[l.mode]++
		if l.refs == 0 {
			lingering++
		}
	}
	for _, l := range m.leases {
		leases[leaseKind(l.ID)]++
		if l.Union != "" {
			unions++
		}
	}
	m.mu.Unlock()

	var bg layerfs.CompleterStats
	if m.complete != nil {
		bg = m.complete.Stats()
		counter(descCompleted, bg.Files)
		counter(descCompBytes, bg.Bytes)
		counter(descCompFail, bg.Failed)
		gauge(descPending, int64(bg.Pending))
	}
	counter(descFetched, fs.BytesFetched, "frames")
	counter(descFetched, m.starts.PackBytes(), "pack")
	counter(descFetched, bg.Fetched, "completion")
	counter(descFetched, m.metrics.layerBytes.Load(), "layer")
	counter(descFetched, m.metrics.verifyBytes.Load(), "verify")
	counter(descRequests, fs.Requests)
	counter(descFetchErrors, fs.SourceErrors)
	counter(descCorrupt, fs.CorruptFrames)
	counter(descFrames, fs.FramesFetched, "registry")
	counter(descFrames, fs.CacheHits, "cache")
	counter(descFrames, fs.MemoryHits, "memory")
	counter(descOpens, fs.PassthroughOpens, "passthrough")
	counter(descOpens, fs.ServedOpens, "served")
	counter(descReads, fs.ServedReads)
	counter(descReadBytes, fs.ServedBytes)

	st := m.cache.Stats()
	gauge(descCacheBytes, st.FrameBytes, "frame")
	gauge(descCacheBytes, st.FileBytes, "file")
	gauge(descCacheItems, int64(st.Frames), "frame")
	gauge(descCacheItems, int64(st.Files), "file")
	gauge(descCacheLimit, st.MaxBytes)
	counter(descCacheHits, st.Hits)
	counter(descCacheMisses, st.Misses)
	counter(descEvictions, st.Evictions)
	counter(descCacheBad, st.Corrupt)

	for mode, n := range mounted {
		gauge(descLayers, n, mode)
	}
	gauge(descLingering, lingering)
	gauge(descUnions, unions)
	for kind, n := range leases {
		gauge(descLeases, n, kind)
	}
	m.metrics.readMiss.Collect(ch)
	m.metrics.fallbacks.Collect(ch)
	m.metrics.verifications.Collect(ch)
}

// leaseKind is the kind of lease id (AcquireRequest.ID): container, mount
// or other.
func leaseKind(id string) string {
	switch kind, _, _ := strings.Cut(id, ":"); kind {
	case "container", "mount":
		return kind
	}
	return "other"
}

// MetricsHandler serves the node's metrics, with the Go runtime's and the
// process's, in the Prometheus text format.
func (m *Manager) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{m}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

// ServeMetrics serves MetricsHandler at http://addr/metrics until stop is
// called. It fails at once when addr cannot be listened on.
func (m *Manager) ServeMetrics(addr string) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.MetricsHandler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	m.log.Info("serving metrics", "addr", "http://"+ln.Addr().String()+"/metrics")
	return func() { srv.Close() }, nil
}
