"""Pixel AUROC and best pixel F1 of the served fused map with the region statistics weighted 1 and 2 (and of
the head's map alone), for trained models on their lines' test splits, at the model's resolution.

    python bench/map_weights.py MODEL LINE [MODEL LINE ...] [--weights 1 2] [--json FILE]

Each model runs eagerly in fp32 on the CPU; its calibration's region weight is replaced by each weight in turn
(`vision.inspector.calibrated_map`), so one pass per model compares the maps on the same outputs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from lineinspect.training.datasets import open_dataset, read_image
from lineinspect.training.metrics import f1_optimal_threshold, pixel_auroc
from lineinspect.vision.inspector import calibrated_map
from lineinspect.vision.model_io import load_inspector
from lineinspect.vision.preprocess import to_batch


def maps_and_masks(model: Path, line: Path, weights: list[float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every test image's maps (one flat array per variant) and its mask at the model's resolution."""
    inspector = load_inspector(model, "cpu", cuda_graphs=False, precision="fp32")
    cal = replace(inspector.calibration, map_source="fused")
    samples = open_dataset(line).test
    maps: dict[str, list[np.ndarray]] = {}
    masks = []
    for first in range(0, len(samples), 32):
        part = samples[first : first + 32]
        images = [read_image(s.path) for s in part]
        with torch.no_grad():
            out = inspector.model(to_batch(images, inspector.input_size, inspector.device), use_memory=True)
        size = out.anomaly_map.shape[-1]
        maps.setdefault("head", []).append(out.anomaly_map.float().numpy())
        for w in weights:
            maps.setdefault(f"w={w:g}", []).append(calibrated_map(out, replace(cal, region_weight=w)).numpy())
        for sample, image in zip(part, images, strict=True):
            mask = sample.load_mask(image.shape[:2]).astype(np.uint8)
            masks.append(cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST))
    # one long row each, as pixel_auroc takes (H, W) maps
    return {k: np.concatenate(v).reshape(1, -1) for k, v in maps.items()}, np.stack(masks).reshape(1, -1).astype(bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="MODEL LINE pairs")
    ap.add_argument("--weights", nargs="+", type=float, default=[1, 2])
    ap.add_argument("--json", type=argparse.FileType("a"), help="append one JSON line per model here")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give models and lines in pairs: MODEL LINE [MODEL LINE ...]")
    for model, line in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        maps, labels = maps_and_masks(Path(model), Path(line), args.weights)
        figures = {k: {"pixel_auroc": round(pixel_auroc([v], [labels]), 4),
                       "best_f1": round(f1_optimal_threshold(v, labels)[1], 3)} for k, v in maps.items()}
        print(Path(line).name, Path(model).name, *(f"{k} {f['pixel_auroc']:.4f} / {f['best_f1']:.3f}"
                                                   for k, f in figures.items()), sep="\t", flush=True)
        if args.json:
            args.json.write(json.dumps({"model": model, "data": line, **figures}) + "\n")


if __name__ == "__main__":
    main()
