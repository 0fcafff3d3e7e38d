"""`lineinspect eval`: standard metrics on a dataset's test split; last stdout line is JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a model on held-out images")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.training.datasets import open_dataset
    from lineinspect.training.evaluate import evaluate
    from lineinspect.vision.model_io import load_inspector

    inspector = load_inspector(args.model, args.device)
    dataset = open_dataset(args.data)
    summary = evaluate(inspector, dataset, batch_size=args.batch_size)
    for key, value in summary.items():
        if key != "per_type":
            print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}", file=sys.stderr)
    for kind, row in summary.get("per_type", {}).items():
        print(f"{kind:>18}: {row}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0
