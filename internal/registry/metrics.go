package registry

import (
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics counts requests, bytes and latencies per route kind.
type Metrics struct {
	reg       *prometheus.Registry
	requests  *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	bytesOut  *prometheus.CounterVec
	bytesIn   *prometheus.CounterVec
	inflight  prometheus.Gauge
	Expansion *prometheus.CounterVec
}

// NewMetrics returns a set of registry metrics in their own Prometheus registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_registry_requests_total", Help: "HTTP requests by route, method and status code.",
		}, []string{"route", "method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "strata_registry_request_duration_seconds", Help: "HTTP request latency by route and method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"route", "method"}),
		bytesOut: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_registry_response_bytes_total", Help: "Response body bytes sent, by route.",
		}, []string{"route"}),
		bytesIn: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_registry_request_bytes_total", Help: "Request body bytes received, by route.",
		}, []string{"route"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "strata_registry_requests_in_flight", Help: "Requests being served.",
		}),
		Expansion: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "strata_expansions_total", Help: "Layer expansions by outcome.",
		}, []string{"outcome"}),
	}
	m.reg.MustRegister(m.requests, m.latency, m.bytesOut, m.bytesIn, m.inflight, m.Expansion,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Wrap returns h instrumented with m. known reports the extensions the
// registry serves: only those name a route label, so the label set stays
// fixed whatever paths clients send (nil: none).
func (m *Metrics) Wrap(h http.Handler, known func(ext string) bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rt, _ := parseRoute(r.URL.Path)
		kind := rt.kind
		if kind == "" {
			kind = "other"
		}
		if kind == "ext" {
			kind = "other"
			if known != nil && known(rt.ext) {
				kind = "ext_" + rt.ext
			}
		}
		m.inflight.Inc()
		defer m.inflight.Dec()
		cr := &countingReader{ReadCloser: r.Body}
		r.Body = cr
		rw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(rw, r)
		m.requests.WithLabelValues(kind, r.Method, strconv.Itoa(rw.code)).Inc()
		m.latency.WithLabelValues(kind, r.Method).Observe(time.Since(start).Seconds())
		m.bytesOut.WithLabelValues(kind).Add(float64(rw.n))
		m.bytesIn.WithLabelValues(kind).Add(float64(cr.n))
	})
}

type countingReader struct {
	io.ReadCloser
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n += int64(n)
	return n, err
}

type statusWriter struct {
	http.ResponseWriter
	code  int
	n     int64
	wrote bool
}

func (s *statusWriter) WriteHeader(code int) {
	if !s.wrote {
		s.code, s.wrote = code, true
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(p []byte) (int, error) {
	s.wrote = true
	n, err := s.ResponseWriter.Write(p)
	s.n += int64(n)
	return n, err
}

// ReadFrom keeps sendfile for blob bodies.
func (s *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	s.wrote = true
	if rf, ok := s.ResponseWriter.(io.ReaderFrom); ok {
		n, err := rf.ReadFrom(r)
		s.n += n
		return n, err
	}
	n, err := io.Copy(struct{ io.Writer }{s.ResponseWriter}, r)
	s.n += n
	return n, err
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }
