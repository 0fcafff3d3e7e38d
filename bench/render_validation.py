"""Would validating on another synthetic defect family tell the head from the fused score? One model:
every source's image AUROC on its held-out good training images against the same images with defects
painted by `training/defects.py` (three per good image, kinds at random), beside the validation AUROC its
training recorded (the generic pasted family) and the AUROC on the real test split.

    python bench/render_validation.py MODEL_DIR TRAIN_DATA [TEST_DATA] >> probe.jsonl

Session 25 (bench/RESULTS.md): on 22 models it did not separate real steel, where fused is the better
source, from the synthetic metal line, where the head is; so training's default source is set by whether
real defects validate it instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lineinspect.images import read_image
from lineinspect.training.data_cache import validation_split
from lineinspect.training.datasets import open_dataset
from lineinspect.training.defects import DEFECT_TYPES, render_defect
from lineinspect.training.metrics import image_auroc
from lineinspect.training.recalibrate import score_sources
from lineinspect.vision.model_io import load_inspector


def aurocs(good: dict[str, np.ndarray], defect: dict[str, np.ndarray]) -> dict[str, float]:
    labels = np.r_[np.zeros(len(next(iter(good.values())))), np.ones(len(next(iter(defect.values()))))]
    return {name: round(image_auroc(np.r_[good[name], defect[name]], labels), 4) for name in good}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("train_data")
    ap.add_argument("test_data", nargs="?", help="default: the training data set's test split")
    args = ap.parse_args()
    inspector = load_inspector(args.model, "cpu", cuda_graphs=False)
    train = open_dataset(args.train_data)
    _, val_idx = validation_split(train.train, 0.1)
    goods = [read_image(train.train[i].path) for i in val_idx if not train.train[i].is_defect]
    rng = np.random.default_rng(0)
    painted = [render_defect(g, DEFECT_TYPES[rng.integers(len(DEFECT_TYPES))], rng)[0] for _ in range(3) for g in goods]
    test = open_dataset(args.test_data or args.train_data).test
    test_scores = score_sources(inspector, [s.path for s in test])
    labels = np.array([s.is_defect for s in test])
    notes = json.loads((Path(args.model) / "config.json").read_text())["calibration"]["notes"]
    print(json.dumps({"model": args.model, "test": args.test_data or args.train_data, "n_val_good": len(goods),
                      "render_val": aurocs(score_sources(inspector, goods), score_sources(inspector, painted)),
                      "synth_val": notes.get("val_image_auroc"),
                      "test_auroc": {k: round(image_auroc(v, labels), 4) for k, v in test_scores.items()}}))


if __name__ == "__main__":
    main()
