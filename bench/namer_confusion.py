"""How well a model names the defects of a labelled test split, and where it confuses them: the
crop namer on crops cut where the model's map puts each defect (as at inference) against crops
cut around the true masks (what the namer could do with a perfect map).

    python bench/namer_confusion.py MODEL_DIR DATA_DIR [--device cuda] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from held_out_defects import labelled_batches

from lineinspect.vision.model_io import load_model_dir
from lineinspect.vision.precision import autocast, autocast_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="also write the result as JSON")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, cal, _ = load_model_dir(args.model)
    model = model.to(device).eval()
    names = list(cal.class_names)
    if not names:
        raise SystemExit(f"{args.model}: the model names no classes (train with class labels or --name-pasted-kinds)")
    size = model.config.encoder.img_size
    confusion = {"map": np.zeros((len(names),) * 2, int), "mask": np.zeros((len(names),) * 2, int)}
    for batch, masks, truth in labelled_batches(args.data, names, size, device):
        with torch.inference_mode(), autocast(device, autocast_dtype(device, "auto")):
            picked = {"map": model.logits(batch).class_logits,
                      "mask": model.logits(batch, class_region=masks).class_logits}
        for crops, logits in picked.items():
            for t, p in zip(truth, logits.float().argmax(1).tolist()):
                confusion[crops][t, p] += 1
    result = {"model": args.model, "data": args.data, "classes": names,
              "n_defects": int(confusion["map"].sum())}
    for crops, m in confusion.items():
        result[f"{crops}_crops_accuracy"] = round(float(m.trace() / max(m.sum(), 1)), 4)
        result[f"{crops}_crops_confusion"] = m.tolist()  # rows: true class, columns: named class
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
