"""Image AUROC of every candidate score source of one trained model on a test split, and the good
parts each flags at a threshold that catches 95 % and 97.5 % of the defects (the part of the ROC
curve a line runs in).

Calibration picks one source on a few dozen validation images; this shows what each would have
scored on held-out data, which is how the source-selection margin in training was set.

    python bench/score_sources.py MODEL_DIR DATA_DIR [--with-train-goods] [--precision auto|fp32] [--json FILE]
        [--marked-goods bench/neu_unseen_marked_goods.json] [--per-image]

--with-train-goods adds the data set's training good parts to its test goods: for a line the model
never trained on (a held-out synthetic line) they are 200 more unseen good parts, so the count of
good parts flagged rests on 250 instead of 50 (also at the model's own threshold). The model runs
in the Inspector's precision (`--precision`, as `lineinspect serve`: auto = bf16 where the device
computes it natively), without its CUDA graphs.

--marked-goods adds "clean_goods" figures: every source's AUROC again without the test good parts that
the JSON file lists for this line (keyed by the data folder's name). bench/neu_unseen_marked_goods.json
lists the good windows of the real-steel lines (bench/neu_unseen.py) that show a visible mark, picked by
eye in file order (bench/RESULTS.md, session 24): NEU-DET's boxes do not cover every defect, so some
windows clear of every box still hold one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc
from lineinspect.training.recalibrate import score_sources
from lineinspect.vision.model_io import load_inspector

RECALLS = (0.95, 0.975)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--with-train-goods", action="store_true",
                    help="add the training good parts (only for data the model did not train on)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 where native) or fp32")
    ap.add_argument("--json", type=argparse.FileType("a"), help="append one JSON line of the figures here")
    ap.add_argument("--per-image", action="store_true",
                    help="also write every image's name, label and score of each source into the JSON line")
    ap.add_argument("--marked-goods", type=Path,
                    help="JSON {line folder name: [good file names]}: also score without those goods")
    args = ap.parse_args()
    inspector = load_inspector(args.model, args.device, cuda_graphs=False, precision=args.precision)
    dataset = open_dataset(args.data)
    samples = dataset.test + ([s for s in dataset.train if not s.is_defect] if args.with_train_goods else [])
    scores = score_sources(inspector, [s.path for s in samples])
    labels = np.array([s.is_defect for s in samples])
    cal = inspector.calibration
    figures = {"model": args.model, "data": args.data, "precision": inspector.precision,
               "n_good": int((~labels).sum()), "n_defect": int(labels.sum()),
               "score_source": cal.score_source, "threshold": cal.threshold}
    for name, values in scores.items():
        v = np.array(values)
        flagged = [int((v[~labels] >= np.quantile(v[labels], 1 - recall)).sum()) for recall in RECALLS]
        print(f"{name:8s} image AUROC {image_auroc(v, labels):.4f}  good parts flagged at defect recall "
              + ", ".join(f"{r:g}: {f} of {int((~labels).sum())}" for r, f in zip(RECALLS, flagged)))
        figures[name] = {"image_auroc": round(image_auroc(v, labels), 4),
                         **{f"goods_flagged_at_recall_{r:g}": f for r, f in zip(RECALLS, flagged)}}
    chosen = np.array(scores[cal.score_source])
    at_threshold = {"goods_flagged": int((chosen[~labels] >= cal.threshold).sum()),
                    "defects_missed": int((chosen[labels] < cal.threshold).sum())}
    figures["at_threshold"] = at_threshold
    if args.marked_goods:
        marked = set(json.loads(args.marked_goods.read_text()).get(Path(args.data).name, []))
        keep = np.array([s.is_defect or s.path.name not in marked for s in samples])
        figures["clean_goods"] = {"n_good": int((~labels[keep]).sum()),
                                  **{name: round(image_auroc(np.array(v)[keep], labels[keep]), 4)
                                     for name, v in scores.items()}}
        print("without the marked goods: " + ", ".join(f"{n} {a}" for n, a in figures["clean_goods"].items()))
    print(f"chosen by calibration: {cal.score_source}; at its threshold {cal.threshold:.3f}: "
          f"{at_threshold['goods_flagged']} of {figures['n_good']} good parts flagged, "
          f"{at_threshold['defects_missed']} of {figures['n_defect']} defects missed")
    if args.per_image:
        figures["per_image"] = {"names": [s.path.name for s in samples], "is_defect": labels.tolist(),
                                **{name: [round(float(x), 5) for x in v] for name, v in scores.items()}}
    if args.json:
        args.json.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
