"""Retrain only the crop namer of a trained model, from fresh weights, for a given time, then name the
held-out line's defects from crops cut where the map puts them and around their true masks. The main
model stays fixed, so namer settings can be compared without the spread of whole training runs.

    python bench/namer_retrain.py MODEL_DIR TRAIN_DATA TEST_DATA SECONDS [name=value ...]

`name=value` overrides a module setting for the run: `BATCH=64`, `LR=0.004` (training.namer_phase),
`crop.SAMPLING=0`, `crop.MARGIN=0.6` (vision.crop_namer); `seed=1` the run's seed; `regions=model` or
`regions=mask` where the namer's training crops are cut (`train --namer-regions`); `width=32` the namer's
base width (CropNamer, 16 by default; a saved model keeps the default only); `save=DIR` writes the
model with its new namer there (a model directory, e.g. to train the language stages on). The last stdout
line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import numpy as np
import torch
from held_out_defects import labelled_batches

import lineinspect.training.namer_phase as namer_phase
import lineinspect.vision.crop_namer as crop_namer
from lineinspect.training.datasets import open_dataset
from lineinspect.training.train_defect import NAMER_SHARE, TrainConfig, Trainer
from lineinspect.vision.model_io import load_model_dir, read_model_config, save_model_dir
from lineinspect.vision.precision import autocast, autocast_dtype


def override(setting: str) -> None:
    name, value = setting.split("=")
    module = crop_namer if name.startswith("crop.") else namer_phase
    name = name.removeprefix("crop.")
    if not hasattr(module, name):
        raise SystemExit(f"{module.__name__} has no setting {name}")
    setattr(module, name, float(value) if "." in value else int(value))


def main() -> None:
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    model_dir, train_data, test_data, seconds, *settings = sys.argv[1:]
    seed, save, regions, width = 0, None, "auto", 16
    for setting in settings:
        if setting.startswith("seed="):
            seed = int(setting.removeprefix("seed="))
        elif setting.startswith("regions="):
            regions = setting.removeprefix("regions=")
        elif setting.startswith("width="):
            width = int(setting.removeprefix("width="))
        elif setting.startswith("save="):
            save = setting.removeprefix("save=")
        else:
            override(setting)
    torch.manual_seed(seed)
    model, cal, _ = load_model_dir(model_dir)
    preset = model.config.encoder.preset
    budget = float(seconds) / NAMER_SHARE  # the namer phase gets NAMER_SHARE of a training's budget
    trainer = Trainer(TrainConfig(preset=preset, name_pasted_kinds=True, time_budget=budget, seed=seed,
                                  namer_regions=regions),
                      open_dataset(train_data), tempfile.mkdtemp())
    trainer.load_data()
    model.head.class_out = crop_namer.CropNamer(len(cal.class_names), width=width)
    trainer.model = model
    start = time.monotonic()
    notes = trainer.fit_namer()
    notes["seconds"] = round(time.monotonic() - start, 1)

    model.eval()
    if save is not None:
        kept = {k: v for k, v in read_model_config(model_dir).items()
                if k not in ("format", "format_version", "lineinspect_version", "model", "calibration", "quantization")}
        kept["namer_retrain"] = {"from": model_dir, "settings": settings, **notes}
        save_model_dir(save, model, cal, extra=kept)
    names, size, device = list(cal.class_names), model.config.encoder.img_size, torch.device("cpu")
    right = {"map": np.zeros(len(names), int), "mask": np.zeros(len(names), int)}
    count = np.zeros(len(names), int)
    for batch, masks, classes in labelled_batches(test_data, names, size, device):
        truth = np.array(classes)
        np.add.at(count, truth, 1)
        with torch.inference_mode(), autocast(device, autocast_dtype(device, "auto")):
            named = {"map": model.logits(batch).class_logits,
                     "mask": model.logits(batch, class_region=masks).class_logits}
        for crops, logits in named.items():
            np.add.at(right[crops], truth, logits.float().argmax(1).numpy() == truth)
    result = {"model": model_dir, "settings": settings, **notes,
              "map_crops_accuracy": round(right["map"].sum() / count.sum(), 4),
              "mask_crops_accuracy": round(right["mask"].sum() / count.sum(), 4),
              "map_crops_per_class": {n: round(r / c, 2) for n, r, c in zip(names, right["map"], count)}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
