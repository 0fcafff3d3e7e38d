"""Resampler shapes, masking and the projector from the vision width."""

from __future__ import annotations

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.fusion.resampler import PRESETS, Resampler, ResamplerConfig, preset


def test_shapes_from_vision_tokens() -> None:
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Resampler(cfg)
    out = model(torch.randn(3, 50, cfg.vision_dim))
    assert out.shape == (3, cfg.n_latents, cfg.dim)
    assert model(torch.randn(1, 7, cfg.vision_dim)).shape == (1, cfg.n_latents, cfg.dim)  # any N
    out.sum().backward()
    assert model.latents.grad is not None and model.proj[1].weight.grad is not None


def test_masked_tokens_are_ignored() -> None:
    torch.manual_seed(0)
    cfg = preset("tiny", depth=2)
    model = Resampler(cfg).eval()
    tokens = torch.randn(1, 10, cfg.vision_dim)
    padded = torch.cat([tokens, torch.randn(1, 5, cfg.vision_dim) * 100], dim=1)
    mask = torch.tensor([[True] * 10 + [False] * 5])
    torch.testing.assert_close(model(padded, mask), model(tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(padded), model(tokens), atol=1e-3)


def test_config() -> None:
    assert ResamplerConfig.from_dict(PRESETS["l14"].to_dict()) == PRESETS["l14"]
    with pytest.raises(LineInspectError, match="n_heads"):
        preset("tiny", dim=30)
    with pytest.raises(LineInspectError, match="vision tokens"):
        Resampler(preset("tiny"))(torch.randn(1, 4, 7))
