"""Image AUROC of every candidate score source of one trained model on a test split, and the good
parts each flags at a threshold that catches 95 % and 97.5 % of the defects (the part of the ROC
curve a line runs in).

Calibration picks one source on a few dozen validation images; this shows what each would have
scored on held-out data, which is how the source-selection margin in training was set.

    python bench/score_sources.py MODEL_DIR DATA_DIR
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc
from lineinspect.vision.inspector import image_scores
from lineinspect.vision.model_io import load_inspector
from lineinspect.vision.preprocess import to_batch

RECALLS = (0.95, 0.975)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    inspector = load_inspector(args.model, args.device)
    samples = open_dataset(args.data).test
    scores: dict[str, list[float]] = {}
    with torch.inference_mode():
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            batch = to_batch([s.load_image() for s in chunk], inspector.input_size, inspector.device)
            out = inspector.model(batch, use_memory=True)
            for name, values in image_scores(out, inspector.calibration).items():
                scores.setdefault(name, []).extend(values.float().cpu().tolist())
    labels = np.array([s.is_defect for s in samples])
    for name, values in scores.items():
        v = np.array(values)
        flagged = [int((v[~labels] >= np.quantile(v[labels], 1 - recall)).sum()) for recall in RECALLS]
        print(f"{name:8s} image AUROC {image_auroc(v, labels):.4f}  good parts flagged at defect recall "
              + ", ".join(f"{r:g}: {f} of {int((~labels).sum())}" for r, f in zip(RECALLS, flagged)))
    print(f"chosen by calibration: {inspector.calibration.score_source}")


if __name__ == "__main__":
    main()
