from __future__ import annotations

import torch

from lineinspect.training.anomaly_synthesis import synthesize_defects
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


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0.0, 1.0) == 0.0
    assert lr_at(0.05, 1.0) == 1.0
    assert abs(lr_at(1.0, 1.0) - 0.02) < 1e-9
    values = [lr_at(p / 100, 1.0) for p in range(5, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
