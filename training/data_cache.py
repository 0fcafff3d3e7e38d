"""Training images held in memory at model resolution (uint8), with their targets.

Lines give a few hundred images: decoding them once and keeping them resized is far cheaper
than a loader pipeline, and the 2-core CPUs this runs on have no cores to spare for workers.
Optionally each image is also kept at a higher "paste" resolution: synthetic defects painted
there and then shrunk to model resolution look like the real ones in a camera frame shrunk the
same way (a 1 px scratch becomes a faint half-pixel line, not a crisp 1 px one).
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
    sources: np.ndarray | None = None  # (N, P, P, 3) uint8 at the paste resolution P > S, or None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> ImageCache:
        """Keep the tensors on `device` (a GPU holds a line's few hundred images easily)."""
        return ImageCache(self.images.to(device), self.masks.to(device), self.is_defect.to(device),
                          self.has_mask.to(device), self.classes.to(device), self.samples, self.boxes,
                          self.sources)

    def subset(self, idx: list[int]) -> ImageCache:
        t = torch.as_tensor(idx, dtype=torch.long)
        return ImageCache(self.images[t], self.masks[t], self.is_defect[t], self.has_mask[t], self.classes[t],
                          [self.samples[i] for i in idx], [self.boxes[i] for i in idx],
                          None if self.sources is None else self.sources[np.asarray(idx, dtype=np.int64)])


def paste_resolution(samples: list[Sample], size: int, factor: int = 2) -> int | None:
    """The resolution to paint synthetic defects at: up to `factor` x the model's, never above the
    images' own (their smallest short side, read from the first few files); None when that is
    not above the model's."""
    sides = [min(s.load_image().shape[:2]) for s in samples[:8]]
    paste = min([factor * size, *sides]) if sides else size
    return paste if paste > size else None


def load_cache(samples: list[Sample], size: int, class_names: list[str], desc: str = "loading",
               paste_size: int | None = None) -> ImageCache:
    n = len(samples)
    images = np.zeros((n, size, size, 3), np.uint8)
    sources = np.zeros((n, paste_size, paste_size, 3), np.uint8) if paste_size else None
    masks = np.zeros((n, size, size), np.uint8)
    has_mask = np.zeros(n, bool)
    classes = np.full(n, -1, np.int64)
    index = {c: i for i, c in enumerate(class_names)}
    boxes = []
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, disable=None)):
        image = s.load_image()
        images[i] = resize_rgb(image, size)
        if sources is not None:
            sources[i] = resize_rgb(image, paste_size)
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
        sources=sources,
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
