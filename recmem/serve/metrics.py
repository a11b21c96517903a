"""The server's Prometheus metrics, in a registry of its own (two servers in one process, as in the
tests, do not share counts).

Exposed at ``GET /metrics`` (text format 0.0.4)::

    recmem_serve_requests_total{endpoint, status}      requests answered, by endpoint and HTTP status
    recmem_serve_errors_total{endpoint, status}        the 4xx and 5xx among them
    recmem_serve_latency_seconds{endpoint}             histogram: time in the service, body to answer
    recmem_serve_rows_per_request                      histogram: rows of each answered /predict
    recmem_serve_model_info{model, version, registry_version}   1 for the live model, 0 for the ones before
    recmem_serve_model_swaps_total                     live model changes (registry alias moves, deltas)
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServerMetrics:
    """Counters and histograms of one server (see the module docstring for the names)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("recmem_serve_requests", "Requests answered", ["endpoint", "status"],
                                 registry=self.registry)
        self._errors = Counter("recmem_serve_errors", "Requests answered with a 4xx or 5xx",
                               ["endpoint", "status"], registry=self.registry)
        self._latency = Histogram("recmem_serve_latency_seconds", "Seconds from body to answer", ["endpoint"],
                                  buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._rows = Histogram("recmem_serve_rows_per_request", "Rows of each answered /predict",
                               buckets=_ROW_BUCKETS, registry=self.registry)
        self._info = Gauge("recmem_serve_model_info", "1 for the live model", ["model", "version", "registry_version"],
                           registry=self.registry)
        self._swaps = Counter("recmem_serve_model_swaps", "Live model changes", registry=self.registry)
        self._live: tuple[str, str, str] | None = None
        self._lock = threading.Lock()

    def request(self, endpoint: str, status: int, seconds: float, rows: int | None) -> None:
        """Count one answered request (``rows``: of an answered /predict, else None)."""
        self._requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self._errors.labels(endpoint, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)
        if rows is not None:
            self._rows.observe(rows)

    def model(self, name: str, version: str, registry_version: str | None) -> None:
        """Mark ``version`` live."""
        labels = (name, version, registry_version or "")
        with self._lock:
            if self._live is not None:
                self._info.labels(*self._live).set(0)
                self._swaps.inc()
            self._info.labels(*labels).set(1)
            self._live = labels

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
