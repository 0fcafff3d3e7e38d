"""Paste the generator's named defect kinds (scratch, crack, ...) onto a line's good images.

Besides the generic synthetic defects, training renders these realistic kinds on the line's own
surfaces (`--paste-types`, all by default). Leaving some kinds out of the pasting and testing on
them measures generalisation to defects nobody predicted. Each pasted image's kind is returned
too, for objectives that want to name it.

Given the images at a higher source resolution, each defect is painted there and its change
shrunk to model resolution the way inference shrinks camera frames (area averaging), so thin
and small defects arrive as faint as real ones do.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from lineinspect.errors import LineInspectError

MASK_COVER = 0.25  # a model pixel belongs to a defect painted at source resolution from this coverage


def paste_named_defects(images: torch.Tensor, masks: torch.Tensor, has: torch.Tensor, kinds: tuple[str, ...],
                        g: torch.Generator, share: float = 0.5, sources: np.ndarray | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace a `share` of the defect-free images in the batch by ones with a named defect.

    images (B,3,S,S) in [0,1]; masks (B,1,S,S); has (B,) bool; sources: the same images
    (B,P,P,3) uint8 at a resolution P > S to paint at, or None to paint at S. Returns the
    updated triple and each image's kind as an index into `kinds` (B,) long, -1 where nothing
    named was pasted.
    """
    from lineinspect.training.synth import DEFECT_TYPES, render_defect

    unknown = [k for k in kinds if k not in DEFECT_TYPES]
    if unknown:
        raise LineInspectError(f"--paste-types: unknown defect type(s) {unknown}; choose from {DEFECT_TYPES}")
    free = torch.nonzero(~has).flatten().tolist()
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
    images, masks, has = images.clone(), masks.clone(), has.clone()
    kind_index = torch.full((len(images),), -1, dtype=torch.long)
    for i in free:
        if rng.random() >= share:
            continue
        k = int(rng.integers(len(kinds)))
        kind = kinds[k]
        if sources is None:
            img = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            out, mask = render_defect(img, kind, rng)
            images[i] = torch.from_numpy(out).permute(2, 0, 1).to(images) / 255
        else:
            change, mask = _painted_at_source(sources[i], kind, rng, images.shape[-1])
            images[i] = (images[i] + torch.from_numpy(change).permute(2, 0, 1).to(images)).clamp_(0, 1)
        masks[i, 0] = torch.from_numpy(mask).to(masks)
        has[i] = bool(mask.any())
        kind_index[i] = k if has[i] else -1
    return images, masks, has, kind_index.to(images.device)


def _painted_at_source(source: np.ndarray, kind: str, rng: np.random.Generator, size: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Paint `kind` on `source` (P,P,3) uint8 and shrink to `size`: the change (size,size,3)
    float32 in [-1, 1] to add to the model-resolution image (which may carry photometric
    jitter the source lacks) and the mask (size,size) bool."""
    from lineinspect.training.synth import render_defect

    out, mask = render_defect(source, kind, rng)
    shrink = (size, size)
    before = cv2.resize(source, shrink, interpolation=cv2.INTER_AREA).astype(np.float32)
    after = cv2.resize(out, shrink, interpolation=cv2.INTER_AREA).astype(np.float32)
    cover = cv2.resize(mask.astype(np.float32), shrink, interpolation=cv2.INTER_AREA)
    small = cover >= MASK_COVER
    if not small.any():  # a defect too small to cover a quarter pixel: keep its strongest pixel
        small = cover >= cover.max()
    return (after - before) / 255, small
