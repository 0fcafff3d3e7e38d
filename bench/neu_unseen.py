"""A real-surface line for defects never seen in training, cut from NEU-DET, in the MVTec AD layout.

NEU-DET has no defect-free images, but most of its boxes cover a small part of a 200x200 strip, so
square windows that stay clear of every box (with a margin) are real defect-free steel: they are
the line's good parts. Windows around the boxes of the test images are its defects, each with the
union of the boxes inside it as the mask. Training reads `train/good` only (the defect model pastes
its own synthetic defects), so every real defect kind is unseen; `lineinspect eval` then gives image
and pixel AUROC on real images. Windows of one size throughout: a size that differed between goods
and defects would be a cue of its own.

    python bench/neu_unseen.py --neu ../shared/datasets/neu-det --out runs/neu_unseen
    lineinspect train --data runs/neu_unseen --preset tiny --time-budget 240 --out runs/neu_unseen_m
    lineinspect eval --model runs/neu_unseen_m --data runs/neu_unseen --json

Caveats: NEU's boxes are not exhaustive on the spread-out kinds (crazing, pitted surface), so some
"good" windows of those images may hold unboxed defect texture; `--kinds` restricts the line.
The split follows `lineinspect`'s VOC rule (the file name's hash), so no test window shares an image
with a training window.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import cv2
import numpy as np

from lineinspect.training.datasets import Sample, open_dataset

MARGIN = 4  # px kept clear around each box for a good window


def box_masks(sample: Sample, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(the boxes' union, the same grown by MARGIN) as bool (H, W) arrays."""
    exact, grown = np.zeros(shape, bool), np.zeros(shape, bool)
    for x0, y0, x1, y1 in sample.boxes:
        exact[y0:y1, x0:x1] = True
        grown[max(0, y0 - MARGIN):y1 + MARGIN, max(0, x0 - MARGIN):x1 + MARGIN] = True
    return exact, grown


def good_windows(image: np.ndarray, grown: np.ndarray, size: int, per_image: int, rng: random.Random
                 ) -> list[np.ndarray]:
    """Up to per_image windows clear of every (grown) box, not overlapping each other by more than half."""
    h, w = grown.shape
    free = [(y, x) for y in range(0, h - size + 1, 4) for x in range(0, w - size + 1, 4)
            if not grown[y:y + size, x:x + size].any()]
    rng.shuffle(free)
    taken: list[tuple[int, int]] = []
    for y, x in free:
        if all(abs(y - ty) >= size // 2 or abs(x - tx) >= size // 2 for ty, tx in taken):
            taken.append((y, x))
        if len(taken) == per_image:
            break
    return [image[y:y + size, x:x + size] for y, x in taken]


def defect_window(image: np.ndarray, exact: np.ndarray, box: tuple[int, int, int, int], size: int,
                  rng: random.Random, fractions: tuple[float, float], tries: int = 40
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """A window touching the box whose share of boxed pixels lies within `fractions`, and its mask: a
    small box falls inside it, a large one straddles its edge (so the window shows surface around
    the defect); None if no window of the tries qualifies."""
    h, w = exact.shape
    x0, y0, x1, y1 = box
    for _ in range(tries):
        x = int(np.clip(round(rng.uniform(x0 - size * 0.75, x1 - size * 0.25)), 0, w - size))
        y = int(np.clip(round(rng.uniform(y0 - size * 0.75, y1 - size * 0.25)), 0, h - size))
        mask = exact[y:y + size, x:x + size]
        if fractions[0] <= mask.mean() <= fractions[1] and mask[
                max(0, y0 - y):max(0, y1 - y), max(0, x0 - x):max(0, x1 - x)].any():
            return image[y:y + size, x:x + size], mask
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neu", default="../shared/datasets/neu-det")
    p.add_argument("--out", default="runs/neu_unseen")
    p.add_argument("--size", type=int, default=64, help="window side in pixels (NEU images are 200x200)")
    p.add_argument("--train-goods", type=int, default=400)
    p.add_argument("--test-goods", type=int, default=120)
    p.add_argument("--defects-per-kind", type=int, default=25)
    p.add_argument("--min-defect-fraction", type=float, default=0.03, help="of the window the boxes must cover")
    p.add_argument("--max-defect-fraction", type=float, default=0.6,
                   help="of the window the boxes may cover: a window inside a large patch shows no surface to "
                   "compare with, only a darker part")
    p.add_argument("--kinds", default="", help="comma-separated NEU classes to keep (default all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    data = open_dataset(args.neu)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    out = Path(args.out)
    counts: dict[str, int] = {}

    def keep(sample: Sample) -> bool:
        return kinds is None or sample.label in kinds

    def write(folder: str, stem: str, window: np.ndarray, mask: np.ndarray | None = None) -> None:
        (out / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / folder / f"{stem}.png"), cv2.cvtColor(window, cv2.COLOR_RGB2BGR))
        counts[folder] = counts.get(folder, 0) + 1
        if mask is not None:
            kind = folder.split("/")[1]
            (out / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / "ground_truth" / kind / f"{stem}_mask.png"), mask.astype(np.uint8) * 255)

    for split, samples, n_goods in (("train", data.train, args.train_goods), ("test", data.test, args.test_goods)):
        samples = [s for s in samples if keep(s)]
        rng.shuffle(samples)
        goods: list[tuple[str, np.ndarray]] = []
        per_image = max(1, -(-n_goods // max(1, len(samples))))  # as few per image as the count allows
        for sample in samples:
            image = sample.load_image()
            _, grown = box_masks(sample, image.shape[:2])
            goods += [(sample.path.stem, wdw) for wdw in good_windows(image, grown, args.size, per_image, rng)]
            if len(goods) >= n_goods:
                break
        for i, (stem, window) in enumerate(goods[:n_goods]):
            write(f"{split}/good", f"{stem}_{i:04d}", window)
    per_kind: dict[str, int] = {}
    for sample in sorted((s for s in data.test if keep(s)), key=lambda s: rng.random()):
        image = sample.load_image()
        exact, _ = box_masks(sample, image.shape[:2])
        picks = [i for i, name in enumerate(sample.box_labels) if kinds is None or name in kinds]
        pick = rng.choice(picks)
        label, box = sample.box_labels[pick], sample.boxes[pick]
        if per_kind.get(label, 0) >= args.defects_per_kind:
            continue
        found = defect_window(image, exact, box, args.size, rng, (args.min_defect_fraction, args.max_defect_fraction))
        if found is None:
            continue
        window, mask = found
        per_kind[label] = per_kind.get(label, 0) + 1
        write(f"test/{label}", f"{sample.path.stem}", window, mask)
    print(json.dumps({"out": str(out), "size": args.size, "images": counts}))


if __name__ == "__main__":
    main()
