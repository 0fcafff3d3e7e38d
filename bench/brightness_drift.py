"""How a trained model's scores hold up when the line's lighting drifts: the test split scored as it is and
with every image's grey levels scaled (gain) or shifted (bias), per score source: image AUROC and the share
of good parts flagged at the model's threshold (which applies to the source it serves).

    python bench/brightness_drift.py MODEL_DIR DATA_DIR [--json OUT.jsonl]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc
from lineinspect.training.recalibrate import score_sources
from lineinspect.vision.model_io import load_inspector

DRIFTS = ((1.0, 0), (1.05, 0), (0.95, 0), (1.0, 8), (1.1, 0))  # (gain, bias in grey levels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--json", default=None, help="append one JSON line per drift here")
    args = ap.parse_args()
    inspector = load_inspector(args.model)
    served, threshold = inspector.calibration.score_source, inspector.threshold
    test = open_dataset(args.data).test
    images, defect = [s.load_image() for s in test], np.array([s.is_defect for s in test])
    for gain, bias in DRIFTS:
        drifted = [np.clip(i.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8) for i in images]
        scores = score_sources(inspector, drifted)
        row = {"model": args.model, "data": args.data, "gain": gain, "bias": bias, "served": served,
               "goods_flagged": round(float((scores[served][~defect] >= threshold).mean()), 4),
               "image_auroc": {k: round(image_auroc(v, defect), 4) for k, v in scores.items()}}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
