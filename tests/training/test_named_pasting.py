"""Named defects pasted onto a batch, at model resolution or painted at source resolution."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.training.named_pasting import (
    RenderPool,
    paste_named_defects,
    start_named_defects,
)
from lineinspect.training.surfaces import make_surface


def _batch(n: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """n metal surfaces at 2*size (uint8, the 'camera' resolution) and at size in [0,1]."""
    import cv2

    rng = np.random.default_rng(0)
    big = np.stack([make_surface("metal", 2 * size, rng) for _ in range(n)])
    small = np.stack([cv2.resize(b, (size, size), interpolation=cv2.INTER_AREA) for b in big])
    return big, torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("at_source", [False, True])
def test_every_free_image_gets_a_named_defect_with_a_mask_of_what_changed(at_source: bool) -> None:
    big, images = _batch(6, 64)
    masks = torch.zeros(6, 1, 64, 64)
    has = torch.tensor([True, False, False, False, False, False])  # image 0 already has a defect
    g = torch.Generator().manual_seed(0)
    out, out_masks, out_has, kinds = paste_named_defects(images, masks, has, ("scratch", "hole"), g, share=1.0,
                                                         sources=big if at_source else None)
    assert torch.equal(out[0], images[0]) and kinds[0] == -1  # taken images stay as they were
    assert out_has.all() and (kinds[1:] >= 0).all() and (kinds[1:] <= 1).all()
    for i in range(1, 6):
        changed = (out[i] - images[i]).abs().amax(0) > 1.5 / 255
        assert out_masks[i, 0].bool().any()
        # nothing changes far from the defect: every visibly changed pixel is in or next to the mask
        near = torch.nn.functional.max_pool2d(out_masks[i], 3, 1, 1)[0].bool()
        assert not (changed & ~near).any()


def test_painting_at_source_resolution_makes_thin_defects_fainter() -> None:
    """A 1 px scratch painted on the 2x frame and shrunk is about half as strong as one painted
    1 px wide at model resolution: what inference sees of a real camera frame."""
    big, images = _batch(24, 64)
    none = torch.zeros(24, dtype=torch.bool)
    zeros = torch.zeros(24, 1, 64, 64)
    contrast = {}
    for at_source in (False, True):
        g = torch.Generator().manual_seed(1)
        out, m, _, _ = paste_named_defects(images, zeros, none, ("scratch",), g, share=1.0,
                                           sources=big if at_source else None)
        diff = (out - images).abs().amax(1, keepdim=True)
        contrast[at_source] = float(diff[m.bool()].mean())
    assert contrast[True] < 0.8 * contrast[False]


def test_unknown_kinds_are_refused() -> None:
    _, images = _batch(1, 32)
    with pytest.raises(LineInspectError, match="unknown defect type"):
        paste_named_defects(images, torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.bool), ("rust",),
                            torch.Generator())


@pytest.mark.parametrize("at_source", [False, True])
def test_a_render_pool_paints_exactly_what_one_process_paints(at_source: bool) -> None:
    big, images = _batch(6, 64)
    masks, has = torch.zeros(6, 1, 64, 64), torch.zeros(6, dtype=torch.bool)
    kinds = ("scratch", "hole", "stain")
    alone = paste_named_defects(images, masks, has, kinds, torch.Generator().manual_seed(3), share=0.8,
                                sources=big if at_source else None)
    pool = RenderPool(2)
    try:
        pooled = paste_named_defects(images, masks, has, kinds, torch.Generator().manual_seed(3), share=0.8,
                                     sources=big if at_source else None, pool=pool)
    finally:
        pool.close()
    assert (alone[3] >= 0).sum() >= 3  # most of the six were painted
    for a, b in zip(alone, pooled):
        assert torch.equal(a, b)


def test_a_painting_process_that_dies_is_reported_with_what_to_do() -> None:
    _, images = _batch(2, 32)
    free = torch.zeros(2, dtype=torch.bool)
    pool = RenderPool(1)
    try:
        paste_named_defects(images, torch.zeros(2, 1, 32, 32), free, ("hole",), torch.Generator(), share=1.0, pool=pool)
        for process in list(pool._executor._processes.values()):  # killed as the OOM killer would
            process.kill()
        deadline = time.monotonic() + 30
        while not pool._executor._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LineInspectError, match="render-workers"):
            start_named_defects(images, free, ("hole",), torch.Generator(), share=1.0, pool=pool)
    finally:
        pool.close()
