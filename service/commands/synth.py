"""`lineinspect synth`: write a synthetic line (good images and named defects) in MVTec AD layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic inspection dataset (MVTec AD layout)")
    p.add_argument("--out", required=True, type=Path, help="folder to create")
    p.add_argument("--n", type=int, default=200, help="good training images (test set is sized from it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--surface", default="mixed", help="metal, textile, tile, pcb or mixed")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lineinspect.training.synth import write_synthetic_dataset

    summary = write_synthetic_dataset(args.out, n=args.n, seed=args.seed, surface=args.surface, size=args.size)
    print(json.dumps(summary, default=str))
    return 0
