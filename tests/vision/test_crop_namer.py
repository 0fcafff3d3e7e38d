"""The crop namer: boxes around the marked region, the packed crop, and a CNN that learns kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lineinspect.errors import LineInspectError
from lineinspect.vision.crop_namer import CROP, MARGIN, MIN_SIDE, CropNamer, crop_boxes, crop_features
from lineinspect.vision.heads import NAMING_SHARES, DefectHead, HeadConfig, focus_region


def test_box_is_a_square_around_the_region_with_a_margin() -> None:
    region = torch.zeros(1, 1, 100, 100)
    region[0, 0, 20:60, 40:50] = 1  # 40 rows x 10 columns
    boxes, side = crop_boxes(region)
    index, x0, y0, x1, y1 = boxes[0].tolist()
    assert index == 0
    assert (x0 + x1) / 2 == pytest.approx(45) and (y0 + y1) / 2 == pytest.approx(40)
    assert x1 - x0 == pytest.approx(40 * (1 + 2 * MARGIN)) == y1 - y0
    assert float(side[0]) == pytest.approx(40 * (1 + 2 * MARGIN) / 100)


def test_tiny_and_empty_regions_get_the_minimum_square() -> None:
    region = torch.zeros(2, 1, 64, 64)
    region[0, 0, 5, 7] = 1  # one pixel
    boxes, _ = crop_boxes(region)
    assert (boxes[:, 3] - boxes[:, 1]).tolist() == [MIN_SIDE, MIN_SIDE]
    assert boxes[0, 1:].tolist() == [7.5 - MIN_SIDE / 2, 5.5 - MIN_SIDE / 2, 7.5 + MIN_SIDE / 2, 5.5 + MIN_SIDE / 2]
    assert boxes[1, 1:].tolist() == [32 - MIN_SIDE / 2, 32 - MIN_SIDE / 2, 32 + MIN_SIDE / 2, 32 + MIN_SIDE / 2]


def test_packed_crop_holds_the_image_around_the_region() -> None:
    images = torch.zeros(1, 3, 128, 128)
    images[:, 0, 30:50, 60:80] = 1.0  # a red square where the region is
    region = torch.zeros(1, 1, 128, 128)
    region[0, 0, 30:50, 60:80] = 1
    packed = crop_features(images, region)
    assert packed.shape == (1, 3 * CROP * CROP + 1)
    crops = packed[:, :-1].view(1, 3, CROP, CROP)
    centre = slice(CROP // 2 - 4, CROP // 2 + 4)
    assert crops[0, 0, centre, centre].min() > 0.99 and crops[0, 1:, centre, centre].max() < 0.01
    assert crops[0, 0, :2].max() < 0.01  # the margin shows the surface around the defect
    assert float(packed[0, -1].exp()) == pytest.approx(20 * (1 + 2 * MARGIN) / 128)


def _shapes(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with a thin line (kind 0) or a round blot (kind 1) on noise, their regions and kinds."""
    images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))) * 0.2 + 0.4
    regions = torch.zeros(n, 1, 64, 64)
    kinds = torch.from_numpy(rng.integers(0, 2, n))
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for i in range(n):
        cy, cx = rng.uniform(20, 44, 2)
        if kinds[i] == 0:
            angle = rng.uniform(0, np.pi)
            along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            mask = (along.abs() < rng.uniform(8, 14)) & (across.abs() < 1.0)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(3, 6) ** 2
        images[i, :, mask] = 0.1
        regions[i, 0, mask] = 1
    return images, regions, kinds


def test_namer_learns_to_tell_lines_from_blots() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    namer = CropNamer(2, width=8)
    opt = torch.optim.AdamW(namer.parameters(), lr=3e-3)
    for _ in range(40):
        images, regions, kinds = _shapes(32, rng)
        loss = F.cross_entropy(namer(crop_features(images, regions)), kinds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    namer.eval()
    images, regions, kinds = _shapes(64, rng)
    with torch.no_grad():
        logits = namer(crop_features(images, regions))
        again = namer(crop_features(images, regions))
    assert torch.equal(logits, again)  # no augmentation outside training
    assert (logits.argmax(1) == kinds).float().mean() >= 0.9


def test_inference_averages_over_the_eight_orientations() -> None:
    torch.manual_seed(0)
    namer = CropNamer(3, width=8).eval()
    packed = torch.randn(5, 3 * CROP * CROP + 1)
    crops, side = packed[:, :-1].view(-1, 3, CROP, CROP), packed[:, -1:]
    turned = torch.cat([torch.rot90(crops, 1, (2, 3)).flip(3).flatten(1), side], 1)
    with torch.no_grad():
        log_probs = namer(packed)
        assert torch.allclose(log_probs, namer(turned), atol=1e-5)  # the same eight views, in another order
        assert torch.allclose(log_probs.exp().sum(1), torch.ones(5), atol=1e-5)
        views = [torch.rot90(crops, k, (2, 3)).flip(3) if flip else torch.rot90(crops, k, (2, 3))
                 for k in range(4) for flip in (False, True)]
        by_hand = torch.stack([namer._logits(v, side).softmax(1) for v in views]).mean(0)
    assert torch.allclose(log_probs.exp(), by_hand, atol=1e-5)


def test_unknown_class_pooling_is_a_clear_error() -> None:
    with pytest.raises(LineInspectError, match="class_pooling 'signature'"):
        HeadConfig(class_pooling="signature")


def test_naming_from_the_map_averages_the_tight_and_the_looser_region() -> None:
    """A faint line whose map is strong on one segment only: the crop at half the peak frames that
    segment, the looser one (NAMING_SHARES) the whole line, and the name averages both."""
    torch.manual_seed(0)
    head = DefectHead(HeadConfig(num_classes=4, stem_channels=(8, 8, 8), decoder_channels=8), 32, 1).eval()
    images = torch.rand(1, 3, 64, 64)
    prob = torch.zeros(1, 1, 64, 64)
    prob[0, 0, 30:32, 8:56] = 0.45  # the line
    prob[0, 0, 30:32, 10:18] = 1.0  # its strongest segment
    regions = [focus_region(prob, share) for share in NAMING_SHARES]
    assert NAMING_SHARES[0] == 0.5 and regions[0].sum() == 16 and regions[1].sum() == 96
    with torch.no_grad():
        named = head._name_from_map(images, prob)
        each = [head.class_out(crop_features(images, r)).exp() for r in regions]
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # the two crops differ
    assert torch.allclose(named.exp(), (each[0] + each[1]) / 2, atol=1e-5)
    assert torch.allclose(named.exp().sum(1), torch.ones(1), atol=1e-5)


def test_regions_at_several_shares_grow_and_crop_as_one_batch() -> None:
    """focus_region at several shares in one pass equals one call per share, stacked share by share,
    and crop_features cuts each of those regions from its own image (3 images, 2 shares)."""
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 64)
    prob = torch.rand(3, 1, 64, 64) * 0.3
    prob[0, 0, 5:9, 5:40] = 0.9
    prob[1, 0, 40:60, 40:44] = 0.6
    prob[2, 0, 20:30, 20:30] = 1.0
    together = focus_region(prob, NAMING_SHARES)
    apart = torch.cat([focus_region(prob, share) for share in NAMING_SHARES])
    assert together.shape == (6, 1, 64, 64) and torch.equal(together, apart)
    crops = crop_features(images, together)
    for k, share in enumerate(NAMING_SHARES):
        assert torch.equal(crops[3 * k : 3 * k + 3], crop_features(images, focus_region(prob, share)))
