from __future__ import annotations

import math

import torch

from lineinspect.training.anomaly_synthesis import STREAK_VISIBLE, dominant_angle, streak_defects, synthesize_defects
from lineinspect.training.schedule import lr_at


def test_synthesis_marks_only_changed_pixels_and_is_seeded() -> None:
    images = torch.full((12, 3, 64, 64), 0.5) + 0.01 * torch.randn(12, 3, 64, 64)
    images = images.clamp(0, 1)
    a = synthesize_defects(images, torch.Generator().manual_seed(3), p_defect=1.0)
    b = synthesize_defects(images, torch.Generator().manual_seed(3), p_defect=1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    out, mask, has = a
    assert has.sum() >= 8  # nearly every image got a visible defect
    changed = (out - images).abs().amax(1, keepdim=True) > 0.06
    assert torch.all(mask.bool() <= changed)  # labelled pixels really changed
    assert torch.all(mask[~has].sum((1, 2, 3)) < 4)


def test_no_defects_when_probability_zero() -> None:
    images = torch.rand(6, 3, 32, 32)
    out, mask, has = synthesize_defects(images, torch.Generator().manual_seed(0), p_defect=0.0)
    assert not has.any() and mask.sum() == 0
    assert torch.allclose(out, images)


def stripes(n: int, size: int, vertical: bool) -> torch.Tensor:
    """Grey images whose texture runs one way: soft stripes of random phase and period, light noise."""
    g = torch.Generator().manual_seed(1)
    axis = torch.arange(size).float()
    period = torch.empty(n, 1).uniform_(6, 12, generator=g)
    wave = 0.5 + 0.15 * torch.sin(2 * math.pi * axis / period + torch.rand(n, 1, generator=g) * 6)  # (n, size)
    grid = wave[:, None, :].expand(n, size, size) if vertical else wave[:, :, None].expand(n, size, size)
    return (grid[:, None].expand(n, 3, size, size) + 0.01 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def test_dominant_angle_follows_the_grain_and_finds_none_in_noise() -> None:
    angle, coherence = dominant_angle(stripes(4, 64, vertical=True))  # stripes run down the image: y
    assert torch.allclose(angle.sin().abs(), torch.ones(4), atol=0.02) and bool((coherence > 0.8).all())
    angle, coherence = dominant_angle(stripes(4, 64, vertical=False))
    assert torch.allclose(angle.cos().abs(), torch.ones(4), atol=0.02)
    _, coherence = dominant_angle(0.5 + 0.1 * torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert bool((coherence < 0.2).all())


def test_streaks_are_faint_labelled_where_visible_and_run_with_the_grain() -> None:
    images = stripes(32, 64, vertical=True)
    out, changed = streak_defects(images, torch.Generator().manual_seed(0))
    change = (out - images).abs().amax(1, keepdim=True)
    assert float(change.max()) <= 0.12 + 1e-6  # faint: at most about 31 grey levels
    assert torch.all(changed.bool() <= (change > STREAK_VISIBLE))
    assert int((changed.flatten(1).sum(1) >= 4).sum()) >= 28  # nearly all visible
    # most labels are taller than wide: they follow the vertical grain (a quarter may go any way)
    rows = changed.amax(3).flatten(1).sum(1)
    cols = changed.amax(2).flatten(1).sum(1)
    assert int((rows > cols).sum()) >= 20


def test_streak_share_replaces_only_that_share_and_zero_keeps_the_stream() -> None:
    images = stripes(64, 32, vertical=True)
    plain = synthesize_defects(images, torch.Generator().manual_seed(5), p_defect=1.0)
    zero = synthesize_defects(images, torch.Generator().manual_seed(5), p_defect=1.0, p_streak=0.0)
    assert all(torch.equal(x, y) for x, y in zip(plain, zero))
    out, _, _ = synthesize_defects(images, torch.Generator().manual_seed(5), p_defect=1.0, p_streak=1.0)
    assert float((out - images).abs().max()) <= 0.12 + 1e-6  # every defect a streak


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0.0, 1.0) == 0.0
    assert lr_at(0.05, 1.0) == 1.0
    assert abs(lr_at(1.0, 1.0) - 0.02) < 1e-9
    values = [lr_at(p / 100, 1.0) for p in range(5, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
