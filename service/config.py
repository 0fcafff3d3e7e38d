"""The server's one configuration object, validated once when built."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lineinspect.errors import LineInspectError
from lineinspect.images import MAX_PIXELS


@dataclass(frozen=True)
class ServerConfig:
    # Network. 127.0.0.1 by default so that nothing is exposed by accident; containers and
    # hosts serving a line set "0.0.0.0" (or "[::]") explicitly.
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (RunningServer.port tells which)
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None = off, 0 = free port

    # Model.
    model_dir: Path | None = None  # None: the CLI serves the cached default model
    device: str = "cpu"

    # Dynamic batching (see service/batcher.py for the policy).
    min_batch: int = 4  # floor of the adaptive target batch size
    max_batch: int = 64  # most images per model call
    max_delay_ms: float = 5.0  # longest an item waits for a batch to fill while the worker is idle
    queue_size: int = 256  # waiting items per priority lane (decoding + queued); full -> overloaded

    # Requests.
    max_message_mb: int = 32  # largest gRPC message either way; bigger -> RESOURCE_EXHAUSTED
    max_image_pixels: int = MAX_PIXELS  # decoded width*height limit, checked from the header first
    decode_workers: int = 0  # threads decoding images and encoding heatmaps; 0 = by device (decode_threads)
    jpeg_decode: str = "auto"  # where JPEG frames decode: "cpu", "gpu" (nvJPEG), "auto" = gpu on a CUDA device
    stream_window: int = 256  # frames one stream may have in flight before the server stops reading
    frame_timeout_ms: float = 2000.0  # a stream frame older than this is dropped (DEADLINE_EXCEEDED); 0 = off

    # Security (all optional; see service/security.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set -> mutual TLS: clients must present a cert signed by it
    auth_token_file: Path | None = None  # set -> every RPC but health needs "authorization: Bearer <token>"

    # Shutdown.
    grace_s: float = 10.0  # SIGTERM: how long in-flight work may take to finish

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise LineInspectError(f"server: {name} {value} is not a TCP port (0..65535)")
        if not 1 <= self.min_batch <= self.max_batch:
            raise LineInspectError(
                f"server: need 1 <= min_batch <= max_batch, got min_batch={self.min_batch}, "
                f"max_batch={self.max_batch}"
            )
        if self.max_delay_ms < 0:
            raise LineInspectError(f"server: max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.queue_size < 1:
            raise LineInspectError(f"server: queue_size must be >= 1, got {self.queue_size}")
        if not 1 <= self.max_message_mb <= 2047:
            raise LineInspectError(f"server: max_message_mb must be 1..2047, got {self.max_message_mb}")
        if self.max_image_pixels < 1:
            raise LineInspectError(f"server: max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.decode_workers < 0 or self.stream_window < 1:
            raise LineInspectError("server: decode_workers must be >= 0 and stream_window >= 1")
        if self.jpeg_decode not in ("auto", "cpu", "gpu"):
            raise LineInspectError(f"server: jpeg_decode must be auto, cpu or gpu, got {self.jpeg_decode!r}")
        if self.frame_timeout_ms < 0 or self.grace_s < 0:
            raise LineInspectError("server: frame_timeout_ms and grace_s must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise LineInspectError("server: TLS needs both a certificate and a key (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise LineInspectError("server: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def decode_threads(self) -> int:
        """Decode pool size. On a CPU device the model needs the cores, so at most 4; on a GPU
        decoding is the host's main work (32 cameras of 640x480 JPEG at 1.5 ms each need ~4 cores
        for 2,500 frames/s), so all cores but one for the event loop and the batch worker, up to 16."""
        if self.decode_workers:
            return self.decode_workers
        cpus = os.cpu_count() or 1
        return min(4, cpus) if self.device == "cpu" else max(1, min(16, cpus - 1))

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
