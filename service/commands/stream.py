"""`lineinspect stream`: send a camera feed to a server and print a JSON line per verdict."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lineinspect.service.stream_client import StreamConfig


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "stream",
        help="stream a camera, video file or image folder to a server",
        description="Send frames over one InspectStream call; print one JSON line per frame result on "
        "stdout and a summary line at the end. When the server is slower than the source, the newest "
        "frame wins (older ones count as client drops).",
    )
    p.add_argument("--source", required=True,
                   help="device index (0), rtsp:// or http:// URL, video file, or folder of images (sorted)")
    p.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="the server, or replicas as IP:PORT,IP:PORT (gRPC round-robin, one replica per camera stream)")
    p.add_argument("--camera-id", required=True, help="name of this camera in results and metrics")
    p.add_argument("--fps", type=float, default=None,
                   help="cap on frames read per second (default: a video file's own rate, else unpaced)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after reading this many frames")
    p.add_argument("--loop", action="store_true", help="replay a video file or image folder forever")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of sent frames (1..100)")
    p.add_argument("--max-in-flight", type=int, default=2,
                   help="frames awaiting a reply before newer ones replace waiting ones (default 2)")
    p.add_argument("--annotate", type=Path, default=None, metavar="OUT.mp4",
                   help="write the answered frames with overlays to this MP4 (mp4v)")
    p.add_argument("--heatmaps", action="store_true", help="ask for heatmaps (drawn into --annotate)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the server's bearer token")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="client private key (PEM) for mutual TLS")
    p.add_argument("--backoff-max", type=float, default=10.0, help="longest wait between reconnects, s")
    p.add_argument("--give-up-after", type=float, default=None,
                   help="stop when the server is unreachable this many seconds (default: retry forever)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> StreamConfig:
    from lineinspect.service.stream_client import StreamConfig

    return StreamConfig(
        source=args.source, server=args.server, camera_id=args.camera_id, fps=args.fps,
        max_frames=args.max_frames, jpeg_quality=args.jpeg_quality, annotate=args.annotate, loop=args.loop,
        heatmaps=args.heatmaps, max_in_flight=args.max_in_flight, token_file=args.token_file,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, backoff_max_s=args.backoff_max,
        give_up_after_s=args.give_up_after,
    )


def run(args: argparse.Namespace) -> int:
    from lineinspect.service.stream_client import StreamClient

    client = StreamClient(config_from_args(args))

    def stop(signum: int, frame: object) -> None:
        # First Ctrl-C / SIGTERM: stop reading, let sent frames be answered, print the summary.
        client.request_stop()
        signal.signal(signum, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
