"""The evidence tokens' decision features: what the fast path concluded, in a form the decoder can copy."""

from __future__ import annotations

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.report_model import EvidenceConfig, decision_summary, evidence_tokens


def _map_with_blob(size: int, y: slice, x: slice, background: float = 0.2) -> torch.Tensor:
    amap = torch.full((1, 1, size, size), background)
    amap[0, 0, y, x] = 0.9
    return amap


def test_focus_centroid_ignores_faint_background_and_names_the_cell() -> None:
    amap = _map_with_blob(30, slice(2, 6), slice(22, 28))  # a blob in the top right ninth
    out = decision_summary(amap, torch.tensor([0.8]), 0.5, torch.tensor([[0.1, 2.0, -1.0]]))
    score, verdict, fy, fx = out[0, :4].tolist()
    assert score == pytest.approx(0.8) and verdict == 1.0
    assert fy == pytest.approx(4 / 30, abs=1e-4) and fx == pytest.approx(25 / 30, abs=1e-4)  # the blob's centre
    cell = out[0, 4:13]
    assert cell.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]  # row-major: top right
    assert out[0, 13:].tolist() == [0, 1, 0]  # the named class
    # a plain map-weighted centroid would have been dragged towards the centre by the background
    w = amap[0, 0] / amap.sum()
    assert (w.sum(1) * (torch.arange(30) + 0.5) / 30).sum() < 0.6


def test_verdict_follows_the_threshold_not_the_raw_score() -> None:
    amap = _map_with_blob(16, slice(6, 10), slice(6, 10))
    below = decision_summary(amap.expand(2, -1, -1, -1), torch.tensor([0.30, 0.31]), 0.305, None)
    assert below[:, 1].tolist() == [0.0, 1.0]
    assert below.shape == (2, EvidenceConfig.N_DECISION)
    assert below[0, 4:13].argmax().item() == 4  # centre


def test_decision_tokens_need_the_score_and_old_layouts_still_load() -> None:
    cfg = EvidenceConfig(patch_dim=8, grid=4, n_classes=3, decision=True)
    patches, amap = torch.randn(2, 16, 8), torch.rand(2, 1, 32, 32)
    logits, images = torch.randn(2, 3), torch.rand(2, 3, 32, 32)
    tokens = evidence_tokens(patches, amap, torch.rand(2), logits, cfg, images, (torch.rand(2), 0.5))
    assert tokens.shape == (2, 16, cfg.dim)
    assert cfg.dim == EvidenceConfig(patch_dim=8, grid=4, n_classes=3).dim + EvidenceConfig.N_DECISION + 3
    with pytest.raises(LineInspectError, match="calibrated score"):
        evidence_tokens(patches, amap, torch.rand(2), logits, cfg, images)
    # a language.json written before the decision features reads as the layout it was trained with
    old = {"patch_dim": 8, "grid": 4, "n_classes": 3, "pos_freqs": 4, "summary": True}
    assert EvidenceConfig(**old).decision is False
