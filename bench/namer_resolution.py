"""Would the crop namer name better from crops cut at twice the model's resolution? Renders one pool of
named defects on the line's good images at twice the model's input size, cuts each crop once from that
image and once from it shrunk to the model's size (as the namer is trained today), trains a fresh namer on
each for the same steps, and names the held-out line's defects from crops around their true masks at the
same two resolutions. The true masks take the map out of the comparison: only resolution differs.

    python bench/namer_resolution.py MODEL_DIR TRAIN_DATA TEST_DATA [STEPS]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import lineinspect.vision.crop_namer as crop_namer
from lineinspect.training.datasets import open_dataset
from lineinspect.training.namer_phase import BATCH, LR
from lineinspect.training.synth import render_defect
from lineinspect.vision.model_io import load_model_dir

POOL = 4400  # about the examples a 45 s namer phase of a `tiny` run renders
MIN_SIDE = crop_namer.MIN_SIDE  # the floor at model resolution


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)[None]


def shrunk_mask(mask: np.ndarray, size: int) -> np.ndarray:
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return cover >= min(0.25, cover.max())


def crop(image: np.ndarray, mask: np.ndarray, normalize, min_side: int, seed: int | None) -> torch.Tensor:
    crop_namer.MIN_SIDE = min_side  # the floor is in pixels: twice the pixels at twice the resolution
    jitter = None if seed is None else torch.Generator().manual_seed(seed)
    return crop_namer.crop_features(normalize(as_tensor(image)), torch.from_numpy(mask).float()[None, None], jitter)


def train_and_name(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, truth: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    namer = crop_namer.CropNamer(int(y.max()) + 1).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(namer.parameters(), lr=LR, weight_decay=0.05)
    namer.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LR * max(0.05, 0.5 * (1 + np.cos(np.pi * step / steps)))
        rows = torch.randint(len(y), (BATCH,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(namer(x[rows].float()), y[rows], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    namer.eval()
    with torch.no_grad():
        return round(float((namer(test_x).argmax(1) == truth).float().mean()), 4)


def main() -> None:
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    model_dir, train_data, test_data = sys.argv[1:4]
    steps = int(sys.argv[4]) if len(sys.argv) == 5 else 420
    model, cal, _ = load_model_dir(model_dir)
    kinds, size = list(cal.class_names), model.config.encoder.img_size
    if not kinds:
        raise SystemExit(f"{model_dir}: the model names no classes (train with --name-pasted-kinds)")
    mean, std = model.mean.cpu(), model.std.cpu()

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    goods = [s.load_image() for s in open_dataset(train_data).train if not s.is_defect]
    rng = np.random.default_rng(0)
    pools: dict[str, list[torch.Tensor]] = {"model": [], "double": []}
    labels: list[int] = []
    start = time.monotonic()
    while len(labels) < POOL:
        source = cv2.resize(goods[rng.integers(len(goods))], (2 * size, 2 * size), interpolation=cv2.INTER_AREA)
        kind = int(rng.integers(len(kinds)))
        painted, mask = render_defect(source, kinds[kind], rng)
        if not mask.any():
            continue
        small = cv2.resize(painted, (size, size), interpolation=cv2.INTER_AREA)
        pools["model"].append(crop(small, shrunk_mask(mask, size), normalize, MIN_SIDE, len(labels)))
        pools["double"].append(crop(painted, mask, normalize, 2 * MIN_SIDE, len(labels)))
        labels.append(kind)
    render_s = time.monotonic() - start
    min_side = {"model": MIN_SIDE, "double": 2 * MIN_SIDE}
    resolution = {"model": size, "double": 2 * size}
    test = [s for s in open_dataset(test_data).test if s.is_defect and s.label in kinds]
    truth = torch.tensor([kinds.index(s.label) for s in test])
    y = torch.tensor(labels)
    result = {"model": model_dir, "steps": steps, "pool": len(labels), "render_seconds": round(render_s, 1)}
    for name, crops in pools.items():
        side = resolution[name]
        test_x = []
        for s in test:
            image = s.load_image()
            mask = s.load_mask(image.shape[:2])
            image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
            test_x.append(crop(image, shrunk_mask(mask, side), normalize, min_side[name], None))
        result[f"true_mask_accuracy_at_{side}px"] = train_and_name(torch.cat(crops).half(), y, torch.cat(test_x),
                                                                  truth, steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
