"""Server assembly: engine + servicer + health + reflection + security + metrics, and the
graceful shutdown.

Shutdown order (SIGTERM, SIGINT or `RunningServer.stop`):
1. health turns NOT_SERVING, so load balancers stop sending new calls;
2. the engine drains: new items are refused (UNAVAILABLE, or a SHUTTING_DOWN Drop on open
   streams), queued ones still run;
3. the gRPC server stops accepting calls and gives in-flight ones `grace` seconds to finish;
   calls still open after that (e.g. camera streams that never close) are cancelled;
4. the batcher and its threads stop, then the language decode thread, then the metrics endpoint.

With a language part (``language``), a DescribeEngine runs its own decode thread; the engine's
fast batch worker feeds it evidence tokens of stream frames (service/describe.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lineinspect.errors import LineInspectError
from lineinspect.service.config import ServerConfig
from lineinspect.service.engine import InspectionEngine, InspectorLike
from lineinspect.service.metrics import MetricsHttpServer, ServiceMetrics
from lineinspect.service.security import BearerTokenInterceptor, read_tokens, server_credentials
from lineinspect.service.servicer import InspectionServicer
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from lineinspect.moe_lm.report_model import LanguagePart
    from lineinspect.service.describe import DescribeConfig, DescribeEngine

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InspectionService"].full_name

# ------------------------------------------------------------------------------ logging

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Route all logging to stderr as JSON lines, replacing the root handlers (a server
    process logs one format only)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)


# ------------------------------------------------------------------------------ server


@dataclass
class RunningServer:
    """A started server. `port` is the bound gRPC port; `stop(grace)` shuts down gracefully."""

    config: ServerConfig
    server: grpc.aio.Server
    engine: InspectionEngine
    health: health.aio.HealthServicer
    metrics: ServiceMetrics
    port: int
    metrics_http: MetricsHttpServer | None = None
    describer: DescribeEngine | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.port if self.metrics_http is not None else None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown (see the module docstring); safe to call more than once."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        t0 = time.perf_counter()
        log.info("draining", extra={"grace_s": grace})
        try:
            await self.health.enter_graceful_shutdown()  # every service -> NOT_SERVING
            self.engine.drain()
            await self.server.stop(grace)
            await self.engine.stop(timeout=max(0.0, grace - (time.perf_counter() - t0)) + 1.0)
            if self.describer is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.describer.stop)
            if self.engine.tap is not None:
                self.engine.tap.close()  # the inspector may outlive this server
        finally:
            if self.metrics_http is not None:
                self.metrics_http.close()
            self._stopped.set()
            log.info("stopped", extra={"drain_s": round(time.perf_counter() - t0, 3)})

    async def wait(self) -> None:
        """Until the server terminates."""
        await self.server.wait_for_termination()


async def start_server(
    config: ServerConfig,
    inspector: InspectorLike,
    warmup: bool = True,
    language: LanguagePart | None = None,
    describe_config: DescribeConfig | None = None,
) -> RunningServer:
    """Build and start a server for `inspector` on `config.host:config.port` (0 = free port).

    `language` (the model directory's language part) turns Describe on; without it Describe
    answers UNIMPLEMENTED. It needs the real Inspector (its defect model feeds the evidence)."""
    credentials = server_credentials(config)  # fails early on unreadable cert files
    metrics = ServiceMetrics()
    interceptors = []
    if config.auth_token_file is not None:
        tokens = read_tokens(config.auth_token_file)
        interceptors.append(
            BearerTokenInterceptor(
                tokens, on_reject=lambda method: metrics.record(method.rsplit("/", 1)[-1], "UNAUTHENTICATED")
            )
        )
    engine = InspectionEngine(inspector, config, metrics)
    describer = _language_engine(engine, inspector, language, describe_config)
    await engine.start(warmup=warmup)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use must fail, not be silently shared
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    servicer = InspectionServicer(engine, metrics, config.stream_window, config.frame_timeout_ms, describer)
    pb_grpc.add_InspectionServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is not None:
            port = server.add_secure_port(config.address, credentials)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as exc:
        await engine.stop(timeout=0)
        if describer is not None:
            describer.stop()
        raise LineInspectError(f"cannot listen on {config.address} ({exc}); is the port in use?") from exc
    if port == 0:
        await engine.stop(timeout=0)
        if describer is not None:
            describer.stop()
        raise LineInspectError(f"cannot listen on {config.address}; is the port in use or the host wrong?")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(config, server, engine, health_servicer, metrics, port, describer=describer)
    if config.metrics_port is not None:
        try:
            running.metrics_http = MetricsHttpServer(metrics, config.host, config.metrics_port)
        except OSError as exc:
            await running.stop(0)
            raise LineInspectError(f"--metrics-port {config.metrics_port}: cannot listen ({exc})") from exc
    log.info(
        "serving",
        extra={
            "host": config.host, "port": port, "tls": config.tls, "mtls": config.tls_client_ca is not None,
            "auth": config.auth_token_file is not None, "metrics_port": running.metrics_port,
            "min_batch": config.min_batch, "max_batch": config.max_batch, "max_delay_ms": config.max_delay_ms,
            "queue_size": config.queue_size, "describe": describer is not None,
        },
    )
    return running


def _language_engine(engine: InspectionEngine, inspector: InspectorLike, language: LanguagePart | None,
                     describe_config: DescribeConfig | None) -> DescribeEngine | None:
    """The Describe engine wired to the fast path (evidence tap, frame cache, priority), or None."""
    if language is None:
        return None
    from lineinspect.service.describe import DescribeEngine, EvidenceTap

    model = getattr(inspector, "model", None)
    if model is None:
        raise LineInspectError("Describe needs the real Inspector (its defect model feeds the language path)")
    device = getattr(inspector, "device", "cpu")
    describer = DescribeEngine(language, describe_config, device=device, fast_busy=engine.fast_busy)
    tap = EvidenceTap(model, language.model.config.evidence, lambda: inspector.calibration)
    engine.attach_language(tap, describer.frame_cache)
    describer.start()
    return describer


async def serve_async(config: ServerConfig, inspector: InspectorLike, language: LanguagePart | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or the server ends), then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(config, inspector, language=language)
    # Shielded: cancelling a wait_for_termination() would cancel grpc's own shutdown future.
    waiter = asyncio.ensure_future(asyncio.shield(running.wait()))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("signal received, shutting down" if stop.is_set() else "server terminated")
    finally:
        await running.stop()
        for task in (waiter, stopper):
            task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def serve(config: ServerConfig, inspector: InspectorLike | None = None) -> None:
    """Blocking entry point for the CLI: load the model (unless given) and serve."""
    configure_logging()
    if inspector is None:
        from lineinspect.vision.cpu_threads import single_threaded
        from lineinspect.vision.model_io import load_inspector

        if config.model_dir is None:
            raise LineInspectError("serve: no model directory given")
        with single_threaded():  # the batcher's worker thread owns the OpenMP team (vision.cpu_threads)
            inspector = load_inspector(config.model_dir, config.device)
    language = None
    if config.model_dir is not None and getattr(inspector, "model", None) is not None:
        from lineinspect.moe_lm.report_model import has_language
        from lineinspect.service.describe import load_for_serving

        if has_language(config.model_dir):
            language = load_for_serving(config.model_dir, inspector.model, config.device)
            log.info("language part loaded", extra={"model_dir": str(config.model_dir)})
    asyncio.run(serve_async(config, inspector, language))
