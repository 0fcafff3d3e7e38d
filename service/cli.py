"""`lineinspect` command line: parse arguments, call library functions, report errors in one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lineinspect import __version__
from lineinspect.errors import LineInspectError

# Each module in lineinspect.service.commands exposes register(subparsers).
COMMANDS = ("synth", "train", "distill", "quantize", "evaluate", "calibrate", "predict", "serve", "stream", "audit",
            "ask", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineinspect", description="Industrial defect inspection: train, "
                                     "evaluate, predict, serve over gRPC, stream cameras, audit folders.")
    parser.add_argument("--version", action="version", version=f"lineinspect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lineinspect.service.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LineInspectError as exc:
        print(f"lineinspect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lineinspect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
