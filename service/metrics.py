"""Prometheus metrics of one server. Each server owns its registry, so several servers (tests,
replicas in one process) never collide on metric names."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Milliseconds-scale buckets in seconds: the fast path must stay far under 100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class ServiceMetrics:
    """The server's counters, gauges and histograms; `registry` is what /metrics exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "lineinspect_queue_depth", "Items waiting in the batcher (decoding, queued)", ["lane"], registry=r
        )
        self.batch_size = Histogram(
            "lineinspect_batch_size", "Images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "lineinspect_stage_seconds",
            "Server time per stage (queue, decode, model, post, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "lineinspect_requests", "Finished requests and stream items by method and gRPC status code",
            ["method", "code"], registry=r,
        )
        self.drops = Counter(
            "lineinspect_frame_drops", "Stream frames answered with a Drop, by reason", ["reason"], registry=r
        )
        self.errors = Counter(
            "lineinspect_errors", "Requests and items that ended in an error, by gRPC status code", ["code"],
            registry=r,
        )
        self.inflight_streams = Gauge(
            "lineinspect_open_streams", "Open InspectStream and Audit calls", ["method"], registry=r
        )

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(max(seconds, 0.0))

    def record(self, method: str, code: str) -> None:
        """One finished request (or stream item) with its gRPC status code name."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(code).inc()


class MetricsHttpServer:
    """/metrics over HTTP on a background thread (prometheus_client's WSGI server)."""

    def __init__(self, metrics: ServiceMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
