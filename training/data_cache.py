"""Training images held in memory at model resolution (uint8), with their targets.

Lines give a few hundred images: decoding them once and keeping them resized is far cheaper
than a loader pipeline, and the 2-core CPUs this runs on have no cores to spare for workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from tqdm import tqdm

from lineinspect.training.datasets import Sample
from lineinspect.vision.preprocess import resize_rgb


@dataclass
class ImageCache:
    images: torch.Tensor  # (N, 3, S, S) uint8
    masks: torch.Tensor  # (N, 1, S, S) uint8 {0,1}; all zero for good images
    is_defect: torch.Tensor  # (N,) bool: labelled defect (not synthetic)
    has_mask: torch.Tensor  # (N,) bool: pixel target known (good images: yes, all zero)
    classes: torch.Tensor  # (N,) long class index, -1 when unknown or good
    samples: list[Sample]
    boxes: list[np.ndarray]  # per image (G, 4) labelled boxes x0, y0, x1, y1 in cache pixels; (0, 4) if none

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> ImageCache:
        """Keep the tensors on `device` (a GPU holds a line's few hundred images easily)."""
        return ImageCache(self.images.to(device), self.masks.to(device), self.is_defect.to(device),
                          self.has_mask.to(device), self.classes.to(device), self.samples, self.boxes)

    def subset(self, idx: list[int]) -> ImageCache:
        t = torch.as_tensor(idx, dtype=torch.long)
        return ImageCache(self.images[t], self.masks[t], self.is_defect[t], self.has_mask[t], self.classes[t],
                          [self.samples[i] for i in idx], [self.boxes[i] for i in idx])


def load_cache(samples: list[Sample], size: int, class_names: list[str], desc: str = "loading") -> ImageCache:
    n = len(samples)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    has_mask = np.zeros(n, bool)
    classes = np.full(n, -1, np.int64)
    index = {c: i for i, c in enumerate(class_names)}
    boxes = []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, disable=None)):
        image = s.load_image()
        images[i] = resize_rgb(image, size)
        h, w = image.shape[:2]
        boxes.append(np.array([(x0 * size / w, y0 * size / h, x1 * size / w, y1 * size / h)
                               for x0, y0, x1, y1 in s.boxes], np.float64).reshape(-1, 4))
        mask = s.load_mask(image.shape[:2])
        if mask is not None:
            masks[i] = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
            has_mask[i] = True
        if s.is_defect and s.label in index:
            classes[i] = index[s.label]
    return ImageCache(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(masks).unsqueeze(1),
        is_defect=torch.tensor([s.is_defect for s in samples], dtype=torch.bool),
        has_mask=torch.from_numpy(has_mask),
        classes=torch.from_numpy(classes),
        samples=list(samples),
        boxes=boxes,
    )


def validation_split(samples: list[Sample], fraction: float, minimum: int = 4) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) indices by a hash of each file name; val gets >= `minimum` items."""
    if fraction <= 0 or len(samples) < 2 * minimum:
        return list(range(len(samples))), []
    keyed = sorted(range(len(samples)),
                   key=lambda i: hashlib.sha1(("val:" + samples[i].path.name).encode()).hexdigest())
    n_val = max(minimum, int(round(fraction * len(samples))))
    val = sorted(keyed[:n_val])
    chosen = set(val)
    return [i for i in range(len(samples)) if i not in chosen], val
