"""A training-free baseline for a line: a filter-bank texture descriptor and nearest-neighbour distance
to the good parts' descriptors, with no learned weights at all.

Per pixel, at Gaussian scales 1, 2, 4, 8: the smoothed grey level, |dx|, |dy|, dxx, dyy, |dxy| (scale
normalised); then the local mean and root-mean-square of each over an 11x11 window; every fourth
pixel of the training goods (images shrunk to 64 x 64; at most MAX_BANK rows) forms the bank
(standardised per dimension), a test image scores the
largest distance of its descriptors to their nearest bank row. It shows what plain texture
statistics see on a line, next to the model's sources (bench/score_sources.py).

    python bench/texture_bank_probe.py DATA_DIR [DATA_DIR ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc
from lineinspect.vision.memory_bank import nearest_distance

SCALES, POOL, STRIDE = (1, 2, 4, 8), 11, 4
MAX_BANK = 80_000  # bank rows kept (a random subset beyond)


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = int(3 * sigma) * 2 + 1
    t = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-t**2 / (2 * sigma * sigma))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k))
    return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1))


def descriptors(grey: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, h*w, D) at every STRIDE-th pixel."""
    channels = []
    for s in SCALES:
        g = gaussian(grey, s)
        gy, gx = torch.gradient(g, dim=(2, 3))
        gyy, _ = torch.gradient(gy, dim=(2, 3))
        gxy, gxx = torch.gradient(gx, dim=(2, 3))
        channels += [g, gx.abs() * s, gy.abs() * s, gxx * s * s, gyy * s * s, gxy.abs() * s * s]
    f = torch.cat(channels, 1)
    pad = (POOL // 2,) * 4
    mean = F.avg_pool2d(F.pad(f, pad, mode="reflect"), POOL, 1)
    rms = F.avg_pool2d(F.pad(f * f, pad, mode="reflect"), POOL, 1).sqrt()
    d = torch.cat([mean, rms], 1)[:, :, ::STRIDE, ::STRIDE]
    return d.flatten(2).transpose(1, 2)


def grey_batch(samples: list, size: int = 64) -> torch.Tensor:
    """Grey images in [0, 1], shrunk (area) to size x size: the scales above are for that size."""
    images = np.stack([s.load_image().mean(-1) for s in samples]).astype(np.float32) / 255.0
    return F.adaptive_avg_pool2d(torch.from_numpy(images)[:, None], size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+")
    args = ap.parse_args()
    for data in args.data:
        dataset = open_dataset(data)
        bank = descriptors(grey_batch([s for s in dataset.train if not s.is_defect])).flatten(0, 1)
        bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:MAX_BANK]]
        mean, std = bank.mean(0), bank.std(0) + 1e-6
        test = descriptors(grey_batch(dataset.test))
        dist = nearest_distance(((test - mean) / std).flatten(0, 1), (bank - mean) / std).view(len(test), -1)
        labels = np.array([s.is_defect for s in dataset.test])
        print(f"{data}: texture bank image AUROC {image_auroc(dist.amax(1).numpy(), labels):.3f} "
              f"({len(bank)} bank rows, {len(test)} test images)", flush=True)


if __name__ == "__main__":
    main()
