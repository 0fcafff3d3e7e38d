"""Where a threshold chosen on the training's validation set lets good parts through on held-out lines,
for several trained models: threshold rules built from the validation goods or from all the training
goods, and a simulation of larger validation sets.

    python bench/threshold_tails.py --train metal1 --lines metal2 metal3 --extra-goods metal4 \
        --cache /tmp/thr MODEL_DIR [MODEL_DIR ...]

Per model it scores (and caches as CACHE/<model>.npz): the training's validation set rebuilt (same split,
same pasted copies), every test image of each --lines data set, the good test images of --extra-goods,
and all training goods. A line "passes" a rule with at most 2 good parts flagged and 4 defects missed
(of 50 and 175: the report targets' margins). The simulation draws N "validation goods" from the lines'
and the extra set's good parts (300 draws per model), pairs them with N validation defect scores drawn
with replacement, and reports the F1 rule's false-reject rate on the remaining goods and its defect miss
rate.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threshold_rules import validation_scores  # bench/, next to this script

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import f1_optimal_threshold, threshold_for_false_reject_rate
from lineinspect.vision.model_io import load_inspector

Rule = Callable[[dict], float]


def scores(samples: list, inspector) -> np.ndarray:
    out: list[float] = []
    for first in range(0, len(samples), 16):
        out += [r.score for r in inspector.inspect_batch([s.load_image() for s in samples[first : first + 16]])]
    return np.array(out)


def score_model(model_dir: Path, train: str, lines: list[str], extra: str) -> dict:
    val, val_defect, cal = validation_scores(str(model_dir), train)
    inspector = load_inspector(model_dir)
    out = {"val": val, "val_defect": val_defect, "threshold": cal.threshold,
           "train_goods": scores(open_dataset(train).train, inspector),
           "extra_goods": scores([s for s in open_dataset(extra).test if not s.is_defect], inspector)}
    for line in lines:
        test = open_dataset(line).test
        out[f"line:{line}"] = scores(test, inspector)
        out[f"defect:{line}"] = np.array([s.is_defect for s in test])
    return out


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))


def val_goods(z: dict) -> np.ndarray:
    return logit(z["val"][~z["val_defect"]])


RULES: dict[str, Rule] = {
    "F1 on validation (calibrated)": lambda z: float(z["threshold"]),
    "goods' spread, k = 1.5": lambda z: sigmoid(np.median(val_goods(z)) + 1.5 * (val_goods(z).max()
                                                                                 - np.median(val_goods(z)))),
    "goods' spread, k = 2": lambda z: sigmoid(np.median(val_goods(z)) + 2 * (val_goods(z).max()
                                                                             - np.median(val_goods(z)))),
    "normal fit to goods, z = 3": lambda z: sigmoid(val_goods(z).mean() + 3 * val_goods(z).std(ddof=1)),
    "normal fit to goods, z = 4": lambda z: sigmoid(val_goods(z).mean() + 4 * val_goods(z).std(ddof=1)),
    "highest of all training goods": lambda z: threshold_for_false_reject_rate(z["train_goods"], 0.0),
    "training goods, false rejects 1 %": lambda z: threshold_for_false_reject_rate(z["train_goods"], 0.01),
}


def rule_table(models: dict[str, dict], lines: list[str]) -> None:
    totals: dict[str, list[int]] = {}
    for name, z in models.items():
        for rule, fn in RULES.items():
            threshold = max(float(z["threshold"]), fn(z))  # a rule may only raise the calibrated threshold
            cells, passed = [], 0
            for line in lines:
                s, d = z[f"line:{line}"], z[f"defect:{line}"]
                flagged, missed = int((s[~d] >= threshold).sum()), int((s[d] < threshold).sum())
                cells.append(f"{Path(line).name} {flagged}/{missed}")
                passed += flagged <= 2 and missed <= 4
            extra = int((z["extra_goods"] >= threshold).sum())
            t = totals.setdefault(rule, [0, 0])
            t[0] += passed
            t[1] += len(lines)
            print(f"{name:8s} {rule:36s} threshold {threshold:.3f}  " + "  ".join(cells)
                  + f"  extra goods flagged {extra}")
    print("\nlines passing (<= 2 good parts flagged and <= 4 defects missed), each rule raised to at least F1's:")
    for rule, (passed, n) in totals.items():
        print(f"  {rule:36s} {passed} of {n}")


def simulation(models: dict[str, dict], lines: list[str], sizes: tuple[int, ...] = (20, 35, 50)) -> None:
    rng = np.random.default_rng(0)
    print("\nF1 rule with N validation goods drawn from the held-out lines' goods (300 draws per model):")
    for n in sizes:
        frr, miss = [], []
        for z in models.values():
            goods = np.concatenate([z[f"line:{x}"][~z[f"defect:{x}"]] for x in lines] + [z["extra_goods"]])
            defects = np.concatenate([z[f"line:{x}"][z[f"defect:{x}"]] for x in lines])
            val_defects = z["val"][z["val_defect"]]
            for _ in range(300):
                order = rng.permutation(len(goods))
                vg, rest = goods[order[:n]], goods[order[n:]]
                vd = rng.choice(val_defects, n, replace=True)
                t, _ = f1_optimal_threshold(np.concatenate([vg, vd]), np.r_[np.zeros(n), np.ones(n)])
                frr.append((rest >= t).mean())
                miss.append((defects < t).mean())
        print(f"  N = {n}: false-reject rate {np.mean(frr):.3f}, defects missed {np.mean(miss):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--train", required=True)
    ap.add_argument("--lines", nargs="+", required=True)
    ap.add_argument("--extra-goods", required=True)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "threshold_tails")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    models = {}
    for model_dir in args.models:
        path = args.cache / f"{model_dir.name}.npz"
        if not path.exists():
            np.savez(path, **score_model(model_dir, args.train, args.lines, args.extra_goods))
        models[model_dir.name] = dict(np.load(path))
    rule_table(models, args.lines)
    simulation(models, args.lines)


if __name__ == "__main__":
    main()
