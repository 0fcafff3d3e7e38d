"""`lineinspect demo`: default model, local server, a synthetic camera stream and an audit report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="run the whole product locally: model, server, camera stream, written report, audit",
        description="Train (first run only) or reuse the cached default model, start a gRPC server on "
        "127.0.0.1, stream a synthetic 640x480 camera through it with a live verdict table, then audit "
        "the synthetic line's test images through the server and write report.html. Between the two, the "
        "camera's worst frame gets a written inspection report streamed over Describe. No GPU needed.",
    )
    p.add_argument("--out", type=Path, default=Path("lineinspect-demo"), metavar="DIR",
                   help="audit report folder (default ./lineinspect-demo)")
    p.add_argument("--frames", type=int, default=60, help="camera frames to stream (default 60)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from lineinspect.service.demo import run_demo

    run_demo(out=args.out, frames=args.frames, device=args.device)
    return 0
