"""Milliseconds to paint one named defect at source resolution and shrink it (`training.named_pasting.paint_one`,
what every training batch and the namer's pool pay per pasted defect), median per kind, on one core; and the
per-pixel channel maximum painting uses, numpy's max over the last axis against `channel_max`.

    python bench/paint_defects.py LINE_DIR [--per-kind 20] [--source 448] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from lineinspect.training.datasets import open_dataset
from lineinspect.training.defects import DEFECT_TYPES
from lineinspect.training.named_pasting import paint_one
from lineinspect.training.surfaces import channel_max


def median_us(fn, repeat: int = 50) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e6 * float(np.median(times)), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("line")
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--source", type=int, default=448)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    goods = [s for s in open_dataset(args.line).train if not s.is_defect][:16]
    sources = [cv2.resize(s.load_image(), (args.source, args.source), interpolation=cv2.INTER_AREA) for s in goods]
    per_kind: dict[str, list[float]] = {}
    for i in range(args.per_kind * len(DEFECT_TYPES)):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        start = time.perf_counter()
        paint_one((sources[i % len(sources)], kind, i, args.size, True))
        per_kind.setdefault(kind, []).append(time.perf_counter() - start)
    ms = {k: round(1000 * float(np.median(v)), 2) for k, v in per_kind.items()}
    maxima = {}
    for shape, dtype in (((args.size, args.size, 3), np.float32), ((args.source, args.source, 3), np.uint8)):
        a = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
        maxima[f"{shape[0]}x{shape[1]}x3 {np.dtype(dtype).name}"] = {
            "numpy max over last axis us": median_us(lambda a=a: a.max(axis=2)),
            "channel_max us": median_us(lambda a=a: channel_max(a))}
    for kind, value in ms.items():
        print(f"{kind:>14}: {value} ms")
    print(json.dumps({"paint_ms_median": ms, "channel_maximum": maxima}))


if __name__ == "__main__":
    main()
