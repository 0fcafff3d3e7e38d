"""Train several defect-model variants side by side on CPU cores and evaluate each on held-out data.

Each variant runs in its own process with a fixed number of CPU threads (2 by default, like the
2-core machines lines run on) and the same time budget, so their accuracy per CPU-second compares.

    python bench/accuracy_sweep.py --train DATA1 --test DATA2 --budget 180 --out runs/sweep \
        --variant base preset=tiny --variant p16 preset=tiny,patch_size=16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
from lineinspect.training.datasets import open_dataset
from lineinspect.training.evaluate import evaluate
from lineinspect.training.train_defect import TrainConfig, Trainer
from lineinspect.vision.model_io import load_inspector
fields = json.loads(sys.argv[3])
for k in ("paste_types", "stem_channels"):
    if k in fields: fields[k] = tuple(v for v in str(fields[k]).split("+") if v and v != "none")
if "stem_channels" in fields: fields["stem_channels"] = tuple(map(int, fields["stem_channels"]))
cfg = TrainConfig(**fields)
out = Trainer(cfg, open_dataset(sys.argv[1]), sys.argv[5]).run()
summary = evaluate(load_inspector(out, cfg.device), open_dataset(sys.argv[2]), latency_samples=10)
cfg_json = json.load(open(out / "config.json"))
summary["training"] = cfg_json["training"]
summary["calibration"] = cfg_json["calibration"]
print("RESULT " + json.dumps(summary))
"""


def parse_variant(spec: list[str]) -> tuple[str, dict]:
    name, *rest = spec
    fields: dict = {}
    for item in ",".join(rest).split(","):
        if not item:
            continue
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        fields[key] = value
    return name, fields


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--budget", type=float, default=180)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME K=V,...")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for spec in args.variant:
        name, fields = parse_variant(spec)
        fields.setdefault("time_budget", args.budget)
        env = dict(os.environ)
        if fields.get("device", "cpu") == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        log = open(args.out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-c", CHILD, args.train, args.test, json.dumps(fields),
                                         str(args.threads), str(args.out / name)],
                                        stdout=subprocess.PIPE, stderr=log, text=True, env=env), fields, time.time())
    rows = []
    for name, (proc, fields, start) in procs.items():
        stdout, _ = proc.communicate()
        result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            print(f"{name}: FAILED (see {args.out / name}.log)")
            continue
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        rows.append((name, fields, result, time.time() - start))
    print(f"{'variant':<14}{'img_auroc':>10}{'pix_auroc':>10}{'f1':>7}{'cls_acc':>8}{'box_rec':>8}{'map50':>7}"
          f"{'steps':>7}{'wall_s':>8}  fields")
    for name, fields, r, wall in rows:
        steps = r["training"].get("steps", {})
        print(f"{name:<14}{r.get('image_auroc', float('nan')):>10.4f}{r.get('pixel_auroc', float('nan')):>10.4f}"
              f"{r.get('f1', float('nan')):>7.3f}{r.get('class_accuracy', float('nan')):>8.3f}"
              f"{r.get('box_recall_iou03', float('nan')):>8.3f}{r.get('map50', float('nan')):>7.3f}"
              f"{sum(steps.values()) if steps else 0:>7}{wall:>8.0f}  {fields}")
        per_type = {k: (v.get("image_auroc"), v.get("pixel_auroc")) for k, v in r.get("per_type", {}).items()}
        print(f"{'':<14}per type (img, pix): {per_type}")
        print(f"{'':<14}ms/step {r['training'].get('ms_per_step')} seconds {r['training'].get('seconds')} "
              f"val {r['calibration'].get('notes')}")


if __name__ == "__main__":
    main()
