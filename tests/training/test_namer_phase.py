"""The namer phase renders a pool of named defects and teaches the crop namer to tell them apart."""

from __future__ import annotations

import time

import numpy as np
import torch

from lineinspect.training.data_cache import ImageCache
from lineinspect.training.namer_phase import crops_where_found, namer_pool, partial_masks, train_namer
from lineinspect.training.surfaces import make_surface
from lineinspect.vision.crop_namer import CROP, MIN_SIDE, CropNamer, crop_features


def _cache(n: int, size: int) -> ImageCache:
    rng = np.random.default_rng(0)
    images = np.stack([make_surface("metal", size, rng) for _ in range(n)])
    return ImageCache(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        masks=torch.zeros(n, 1, size, size, dtype=torch.uint8),
        is_defect=torch.zeros(n, dtype=torch.bool),
        has_mask=torch.zeros(n, dtype=torch.bool),
        classes=torch.full((n,), -1),
        samples=[],
        boxes=[np.zeros((0, 4))] * n,
        sources=None,
    )


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def test_pool_holds_one_crop_per_pasted_defect_with_its_kind() -> None:
    crops, kinds = namer_pool(_cache(8, 64), torch.arange(8), ("scratch", "hole"), torch.Generator().manual_seed(0),
                              deadline=0.0, normalize=_identity)
    assert crops.shape == (len(kinds), 3 * CROP * CROP + 1) and crops.dtype == torch.float16
    assert 0 < len(kinds) <= 32 and set(kinds.tolist()) <= {0, 1}
    side = crops[:, -1].float().exp() * 64  # pixels; jittered boxes (0.45-3.5x at most) of at least MIN_SIDE
    assert bool((side >= 0.45 * MIN_SIDE - 0.01).all()) and bool((side <= 3.5 * 64 * 1.6).all())


def test_pool_crops_are_cut_from_the_models_normalised_input() -> None:
    def shift_red(images: torch.Tensor) -> torch.Tensor:
        return images + torch.tensor([4.0, 0.0, 0.0]).view(1, 3, 1, 1)

    g = torch.Generator().manual_seed(1)
    crops, _ = namer_pool(_cache(8, 64), torch.arange(8), ("hole",), g, deadline=0.0, normalize=shift_red)
    pixels = crops[:, :-1].float().view(-1, 3, CROP * CROP).mean(-1)  # (N, 3) mean per channel
    assert float((pixels[:, 0] - pixels[:, 1:].amax(1)).median()) > 3.0  # (boxes past the edge read zeros)


def test_crops_are_cut_where_the_model_finds_the_defect_else_around_the_mask() -> None:
    images = torch.rand(3, 3, 64, 64)
    masks = torch.zeros(3, 1, 64, 64)
    masks[:, :, 10:20, 10:20] = 1.0
    found_region = torch.zeros(3, 1, 64, 64)
    found_region[0, :, 8:22, 8:22] = 1.0  # larger than the mask, on it ...
    found_region[0, :, 50:53, 50:53] = 1.0  # ... and a small second spot: named from the box around both
    found_region[1, :, 40:60, 40:60] = 1.0  # only elsewhere: the mask's box instead
    # image 2: the model finds nothing, the mask's box too

    def region_of(x: torch.Tensor) -> torch.Tensor:
        assert torch.equal(x, images)  # the model sees the pasted images in [0, 1]
        return found_region

    g = torch.Generator().manual_seed(0)
    packed, found = crops_where_found(images, masks, _identity, g, region_of)
    assert found.tolist() == [True, False, False]
    torch.testing.assert_close(packed[0], crop_features(images[:1], found_region[:1])[0])
    side = packed[:, -1].exp() * 64
    assert side[0] == (53 - 8) * 1.6 and bool((side[1:] < 22).all())  # the jittered 10 px mask box, with margin
    packed_none, found_none = crops_where_found(images, masks, _identity, g, None)
    assert not found_none.any() and packed_none.shape == packed.shape


def test_partial_masks_keep_a_nonempty_part_of_each_defect() -> None:
    masks = torch.zeros(4, 1, 64, 64)
    masks[0, :, 30:32, 4:60] = 1.0  # a long scratch
    masks[1, :, 10:40, 10:40] = 1.0  # a blob
    masks[2, :, 50, 50] = 1.0  # one pixel: its window may hold nothing, then it stays whole
    # image 3: no defect at all stays empty
    cut = partial_masks(masks, torch.Generator().manual_seed(0), share=1.0)
    assert bool((cut <= masks).all())  # only ever a part
    assert [bool(c.any()) for c in cut] == [True, True, True, False]
    area, whole = cut.sum((1, 2, 3)), masks.sum((1, 2, 3))
    assert float(area[0]) <= 0.7 * float(whole[0]) + 2 and float(area[1]) <= 0.5 * float(whole[1])
    assert torch.equal(partial_masks(masks, torch.Generator().manual_seed(0), share=0.0), masks)


MIN_STEPS = 60


def test_namer_phase_keeps_to_its_time() -> None:
    start = time.monotonic()
    notes = train_namer(CropNamer(2, width=8), _cache(8, 64), torch.arange(8), ("scratch", "hole"), seed=0,
                        seconds=2.0, device=torch.device("cpu"), normalize=_identity)
    assert time.monotonic() - start < 30  # loosely: CI machines are noisy
    assert notes["namer_steps"] >= 1


def test_namer_learns_the_pasted_kinds_and_reports_it() -> None:
    # learning is asserted after a number of steps, not seconds: a time-bound phase on a slow, busy CPU
    # (45 steps in 10 s quiet on an AVX2-only 2-core host, fewer beside the suite) named 0.51 right
    torch.manual_seed(0)
    namer = CropNamer(2, width=8)
    notes = train_namer(namer, _cache(24, 64), torch.arange(24), ("scratch", "hole"), seed=0, seconds=5.0,
                        device=torch.device("cpu"), normalize=_identity, min_steps=MIN_STEPS)
    assert notes["namer_examples"] >= 32 and notes["namer_steps"] >= MIN_STEPS
    assert notes["namer_heldout_accuracy"] >= notes["namer_heldout_before"]  # a worse refit is not kept
    assert notes["namer_heldout_accuracy"] >= 0.7  # a scratch and a hole are easy to tell apart
    assert not namer.training
    # trained channels-last for speed, handed back in the layout the model directory's safetensors need
    assert all(t.is_contiguous() for t in namer.state_dict().values())
