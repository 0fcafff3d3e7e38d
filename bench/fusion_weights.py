"""Image AUROC of the fused score with the region statistics weighted 1, 1.5, 2, 3, 4, offline, from the
per-image source scores that `bench/score_sources.py --per-image` wrote (one JSON line per model and line).

The fused score averages the head's score with the squashed memory-bank, self-similarity and region-statistics
scores (`vision.inspector.image_scores`); this recombines the stored scores with other weights for the region
statistics, so a weight can be chosen on many trained models without retraining one.

    python bench/fusion_weights.py bench/results/cpu2_neu_unseen_*_sources.jsonl [--weights 1 2]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from lineinspect.training.metrics import image_auroc

OTHERS = ("head", "memory", "novelty")


def fused(per_image: dict, weight: float) -> np.ndarray:
    others = sum(np.array(per_image[k]) for k in OTHERS)
    return (others + weight * np.array(per_image["regions"])) / (len(OTHERS) + weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--weights", nargs="+", type=float, default=[1, 1.5, 2, 3, 4])
    args = ap.parse_args()
    args.weights = sorted({1.0, 2.0, *args.weights})  # the two compared in the last column
    by_line: dict[str, list[list[float]]] = defaultdict(list)
    for path in args.files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_image = record.get("per_image", {})
            if not all(k in per_image for k in (*OTHERS, "regions")):
                continue  # a model without region statistics, or scores written without --per-image
            labels = np.array(per_image["is_defect"], bool)
            by_line[Path(record["data"]).name].append([image_auroc(fused(per_image, w), labels) for w in args.weights])
    print("line", *(f"w={w:g}" for w in args.weights), "models", "w=2 above / below w=1", sep="\t")
    for name, rows in sorted(by_line.items()):
        a = np.array(rows)
        one, two = (a[:, args.weights.index(w)] for w in (1, 2))
        print(name, *(f"{v:.4f}" for v in a.mean(0)), len(a), f"{int((two > one).sum())} / {int((two < one).sum())}",
              sep="\t")

if __name__ == "__main__":
    main()
