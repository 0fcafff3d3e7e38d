"""Self-similarity novelty on feature maps with a known odd location."""

from __future__ import annotations

import torch

from lineinspect.vision.self_similarity import self_similarity_map


def _texture(b: int = 2, c: int = 8, h: int = 12, w: int = 12) -> torch.Tensor:
    """A periodic texture with a little noise: every location has many near twins elsewhere."""
    torch.manual_seed(0)
    tile = torch.randn(b, c, 3, 3)
    return tile.repeat(1, 1, h // 3, w // 3) + 0.05 * torch.randn(b, c, h, w)


def test_an_odd_location_is_the_most_novel_and_typical_ones_are_near_one() -> None:
    feats = _texture()
    feats[0, :, 7, 4] += 5.0  # one foreign location in image 0
    novelty = self_similarity_map(feats)
    assert novelty.shape == (2, 1, 12, 12)
    flat = novelty[0, 0].flatten()
    assert int(flat.argmax()) == 7 * 12 + 4
    assert float(flat.max()) > 5 * float(flat.median())
    assert float(novelty[1].max()) < 2.0  # nothing odd in image 1: every location about typical


def test_novelty_ignores_the_texture_scale_and_has_gradients() -> None:
    feats = _texture()
    feats[:, :, 2, 9] += 3.0
    feats.requires_grad_(True)
    a = self_similarity_map(feats)
    b = self_similarity_map(feats * 10)  # a 10x stronger texture: same relative novelty
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    a.sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_inference_then_training_on_the_same_grid() -> None:
    feats = _texture()
    with torch.inference_mode():
        self_similarity_map(feats)
    trainable = feats.clone().requires_grad_(True)
    self_similarity_map(trainable).sum().backward()  # the cached grid mask must not be an inference tensor
    assert trainable.grad is not None


def test_bf16_autocast_gives_the_float32_map() -> None:
    feats = 100.0 + _texture()  # large common offset: the expanded distance form cancels most of it
    feats[0, :, 7, 4] += 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = self_similarity_map(feats)
    torch.testing.assert_close(under, self_similarity_map(feats), rtol=1e-3, atol=1e-3)
