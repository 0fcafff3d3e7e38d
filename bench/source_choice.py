"""What `lineinspect calibrate --defects` gains by choosing the score source on a few labelled defects.

For each model and line: every score source on the line's test images (`Inspector.source_scores`),
then many random splits into a calibration part (K labelled defects and half the good parts, as a
line engineer would give `calibrate`) and an evaluation part (the rest). On each split the source
is chosen as `calibrate` chooses it (`training.recalibrate.best_source`) and scored on the
evaluation part: image AUROC and defects caught at the false-reject rate, against keeping the
trained source and against each fixed source, on the same splits.

    python bench/source_choice.py MODEL_DIR DATA_DIR [MODEL_DIR DATA_DIR ...] [--k 3 5 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc, threshold_for_false_reject_rate
from lineinspect.training.recalibrate import best_source, compare_sources, score_sources
from lineinspect.vision.model_io import load_inspector


def line_scores(model: str, data: str, device: str, candidates: list[str] | None
                ) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    inspector = load_inspector(model, device, cuda_graphs=False)
    samples = open_dataset(data).test
    scores = {name: v for name, v in score_sources(inspector, [s.path for s in samples]).items()
              if name in (candidates or [name])}
    return scores, np.array([s.is_defect for s in samples]), inspector.calibration.score_source


def simulate(scores: dict[str, np.ndarray], labels: np.ndarray, trained: str, k: int, frr: float,
             repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    defects, goods = np.flatnonzero(labels), np.flatnonzero(~labels)
    arms = ["chosen", "trained", *scores]
    auroc: dict[str, list[float]] = {a: [] for a in arms}
    caught: dict[str, list[float]] = {a: [] for a in arms}
    picks: dict[str, int] = {}
    for _ in range(repeats):
        cal_d = rng.choice(defects, k, replace=False)
        cal_g = rng.choice(goods, len(goods) // 2, replace=False)
        ev = np.setdiff1d(np.arange(len(labels)), np.r_[cal_d, cal_g])
        figures = compare_sources({n: v[cal_g] for n, v in scores.items()}, {n: v[cal_d] for n, v in scores.items()},
                                  frr)
        chosen = best_source(figures, trained)
        picks[chosen] = picks.get(chosen, 0) + 1
        for arm in arms:
            name = chosen if arm == "chosen" else trained if arm == "trained" else arm
            v = scores[name]
            auroc[arm].append(image_auroc(v[ev], labels[ev]))
            t = threshold_for_false_reject_rate(v[cal_g], frr)
            caught[arm].append(float((v[ev][labels[ev]] >= t).mean()))
    return {"k": k, "picks": picks, "auroc": {a: round(float(np.mean(v)), 4) for a, v in auroc.items()},
            "caught": {a: round(float(np.mean(v)), 4) for a, v in caught.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="MODEL_DIR DATA_DIR, repeated")
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5, 8], help="labelled defects given to calibrate")
    ap.add_argument("--target-frr", type=float, default=0.04)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--candidates", nargs="+", help="restrict the sources to these (default: all; calibrate itself "
                    "chooses among training.recalibrate.CANDIDATE_SOURCES and the trained source)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=argparse.FileType("a"))
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give MODEL_DIR DATA_DIR pairs")
    for model, data in zip(args.pairs[::2], args.pairs[1::2]):
        scores, labels, trained = line_scores(model, data, args.device, args.candidates)
        for k in args.k:
            row = {"model": model, "data": data, "trained_source": trained, "target_frr": args.target_frr,
                   "candidates": sorted(scores),
                   **simulate(scores, labels, trained, k, args.target_frr, args.repeats, seed=k)}
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
