"""The labelled defects of a test split in batches, as the namer benchmarks read them: the model's
input batch, the true masks at model resolution and each defect's class index."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.training.datasets import open_dataset
from lineinspect.vision.preprocess import to_batch


def labelled_batches(data: str, names: list[str], size: int, device: torch.device, batch: int = 32
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(images (B,3,S,S), masks (B,1,S,S) in {0,1}, class indices) for the test split's defects of
    the named kinds; a model pixel is defect where a quarter of it is."""
    samples = [s for s in open_dataset(data).test if s.is_defect and s.label in names]
    for first in range(0, len(samples), batch):
        chunk = samples[first : first + batch]
        images = [s.load_image() for s in chunk]
        masks = torch.stack([torch.from_numpy(np.ascontiguousarray(s.load_mask(im.shape[:2]))).float()[None]
                             for s, im in zip(chunk, images)])
        masks = (F.interpolate(masks, size=(size, size), mode="area") >= 0.25).float().to(device)
        yield to_batch(images, size, device), masks, [names.index(s.label) for s in chunk]
