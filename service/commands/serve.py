"""`lineinspect serve`: the gRPC inspection server."""

from __future__ import annotations

import argparse
from pathlib import Path

from lineinspect.errors import LineInspectError
from lineinspect.service.config import ServerConfig


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve defect inspection over gRPC",
        description="Serve Inspect, InspectStream, Audit and GetModelInfo over gRPC, with health checking, "
        "reflection, dynamic batching and optional TLS / bearer tokens. SIGTERM drains and exits 0.",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=None, metavar="MODEL_DIR",
                       help="model directory (default: the cached default model, trained on first use)")
    model.add_argument("--untrained", default=None, metavar="PRESET",
                       help="serve random weights of a preset (tiny, s14, l14): for contract tests and "
                       "benchmarks only, verdicts are meaningless")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 on GPUs and on CPUs with native bf16, fp32 elsewhere")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run the model eagerly instead of from CUDA graphs captured at start-up")
    p.add_argument("--max-batch", type=int, default=64, help="most images per model call (default 64)")
    p.add_argument("--min-batch", type=int, default=4, help="floor of the adaptive batch target (default 4)")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="longest wait for a batch to fill (default 5 ms)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="waiting images per priority lane before the server refuses more (default 256)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="CA bundle (PEM) for client certificates: turns on mutual TLS")
    p.add_argument("--auth-token-file", type=Path, default=None,
                   help="file of accepted bearer tokens, one per line; calls must carry "
                   "'authorization: Bearer <token>' (health checks stay open)")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="threads decoding images (default 0: up to 4 on a CPU device; on a GPU all cores "
                   "but one, up to 16)")
    p.add_argument("--jpeg-decode", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where JPEG frames decode: on the GPU through nvJPEG (gpu), on the CPU (cpu), or "
                   "on the GPU when the model runs on one and nvJPEG works there (auto, the default)")
    p.add_argument("--max-message-mb", type=int, default=32, help="largest gRPC message (default 32 MiB)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight work on SIGTERM")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The parsed flags -> a validated ServerConfig (LineInspectError on bad combinations)."""
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--tls-client-ca", args.tls_client_ca), ("--auth-token-file", args.auth_token_file)):
        if path is not None and not path.is_file():
            raise LineInspectError(f"{flag} {path}: file not found")
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, model_dir=args.model,
        device=args.device, min_batch=args.min_batch, max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms, queue_size=args.queue_size, max_message_mb=args.max_message_mb,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file, grace_s=args.grace, decode_workers=args.decode_workers,
        jpeg_decode=args.jpeg_decode,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from lineinspect.service.server import configure_logging, log, serve
    from lineinspect.vision.cpu_threads import single_threaded
    from lineinspect.vision.model_io import load_inspector, untrained_inspector
    from lineinspect.vision.precision import cpu_has_native_bf16

    config = config_from_args(args)
    configure_logging()
    model_dir = config.model_dir
    if model_dir is None and args.untrained is None:
        from lineinspect.service.defaults import ensure_default_model_in_child

        model_dir = ensure_default_model_in_child()
    with single_threaded():  # the batcher's worker thread owns the process's OpenMP team (vision.cpu_threads)
        if args.untrained is not None:
            inspector = untrained_inspector(args.untrained, args.device, cuda_graphs=args.cuda_graphs)
        else:
            inspector = load_inspector(model_dir, args.device, cuda_graphs=args.cuda_graphs,
                                       precision=args.precision)
    if args.precision == "auto" and inspector.device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU computes bf16 only by emulation, so the model runs in fp32: several times slower than "
                    "on a CPU with AVX-512 BF16 or AMX (s14, two cores: ~170 ms against ~50 ms a frame); an int8 "
                    "copy (`lineinspect quantize`) or a smaller preset answers sooner",
                    extra={"cpu_capability": torch.backends.cpu.get_cpu_capability()})
    serve(config, inspector)
    return 0
