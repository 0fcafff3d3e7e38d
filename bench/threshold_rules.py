"""How a trained model's threshold rules carry from its validation set to a held-out line: the F1-optimal
threshold it was calibrated with against thresholds for a target false-reject rate on the same validation
good images (`lineinspect train --target-frr`). Rebuilds the training's validation set (same split, same
pasted copies), scores it and the test split with the model's score source.

    python bench/threshold_rules.py MODEL_DIR TRAIN_DATA TEST_DATA [TEST_DATA ...]

Rules: the calibrated (F1-optimal) threshold; a target false-reject rate on the validation goods; the
F1-optimal threshold among those whose validation false-reject rate stays within a cap. Prints one row
per rule and test line: threshold, test F1, share of good parts passed, defect recall; then one JSON
line per test line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile

import numpy as np
import torch

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import f1_optimal_threshold, image_auroc, threshold_for_false_reject_rate
from lineinspect.training.train_defect import TrainConfig, Trainer
from lineinspect.vision.inspector import Calibration, image_scores
from lineinspect.vision.model_io import load_inspector, load_model_dir

FALSE_REJECT_RATES = (0.05, 0.1)


def validation_scores(model_dir: str, train_data: str) -> tuple[np.ndarray, np.ndarray, Calibration]:
    """The model's scores on its training's validation set, rebuilt (same split, same pasted copies):
    scores, which are defects (bool), and the model's calibration."""
    model, cal, config = load_model_dir(model_dir)
    trained = config.get("training", {}).get("config", {})  # the training's own options: input size, pasted kinds
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in trained.items() if k in fields and k not in ("device", "pretrained")}
    options.setdefault("preset", model.config.encoder.preset)
    options.setdefault("name_pasted_kinds", bool(cal.class_names))
    trainer = Trainer(TrainConfig(**options), open_dataset(train_data), tempfile.mkdtemp())
    trainer.load_data()
    trainer.model = model.to(trainer.device)
    images, _, labels, _ = trainer.validation_set()
    val = torch.cat([image_scores(o, cal)[cal.score_source] for o in trainer.outputs(images)]).cpu().numpy()
    return val, labels.numpy().astype(bool), cal


def capped_f1_threshold(scores: np.ndarray, defect: np.ndarray, rate: float) -> float:
    """The F1-optimal threshold among those flagging at most floor(rate * n) of the n good scores."""
    floor = threshold_for_false_reject_rate(scores[~defect], rate)
    threshold, _ = f1_optimal_threshold(np.where(scores >= floor, scores, floor - 1.0), defect)
    return max(threshold, floor)


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    model_dir, train_data, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
    val, val_defect, cal = validation_scores(model_dir, train_data)
    rules = {"F1-optimal (calibrated)": cal.threshold}
    for rate in FALSE_REJECT_RATES:
        rules[f"false-reject rate {rate} on validation goods"] = threshold_for_false_reject_rate(val[~val_defect], rate)
        rules[f"F1-optimal, validation false rejects <= {rate}"] = capped_f1_threshold(val, val_defect, rate)
    flags, misses = int((val[~val_defect] >= cal.threshold).sum()), int((val[val_defect] < cal.threshold).sum())
    recorded = cal.notes.get("val_image_auroc", {}).get(cal.score_source)
    print(f"validation: {int((~val_defect).sum())} good, {int(val_defect.sum())} defect; "
          f"calibrated threshold flags {flags} good, misses {misses}; image AUROC {image_auroc(val, val_defect):.4f} "
          f"(the training recorded {recorded}: a rebuild that differs is not the training's validation set)")

    inspector = load_inspector(model_dir)
    for test_data in tests:
        test = open_dataset(test_data).test
        scores, defect = [], []
        for first in range(0, len(test), 16):
            chunk = test[first : first + 16]
            scores += [r.score for r in inspector.inspect_batch([s.load_image() for s in chunk])]
            defect += [s.is_defect for s in chunk]
        scores, defect = np.array(scores), np.array(defect)
        rows = {}
        for name, threshold in rules.items():
            flagged = scores >= threshold
            f1 = 2 * (flagged & defect).sum() / (flagged.sum() + defect.sum())
            rows[name] = {"threshold": round(float(threshold), 4), "test_f1": round(float(f1), 4),
                          "goods_flagged": int(flagged[~defect].sum()), "defects_missed": int((~flagged[defect]).sum()),
                          "good_passed": round(float((~flagged[~defect]).mean()), 4),
                          "defect_recall": round(float(flagged[defect].mean()), 4)}
            print(f"{test_data} {name:45s} " + "  ".join(f"{k} {v}" for k, v in rows[name].items()))
        print(json.dumps({"model": model_dir, "test": test_data, "n_val_good": int((~val_defect).sum()),
                          "n_val_defect": int(val_defect.sum()), "rules": rows}))


if __name__ == "__main__":
    main()
