"""Symmetric InfoNCE against a hand-computed case; temperature clamping; the head."""

from __future__ import annotations

import math

import torch

from lineinspect.fusion.contrastive import ContrastiveHead, contrastive_loss, masked_mean


def test_hand_computed_two_pairs() -> None:
    # unit embeddings: images e1, e2; texts e1, (0.6, 0.8) -> similarities [[1, 0.6], [0, 0.8]]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.3, 0.4]])  # normalised inside the loss
    s = 10.0
    i2t = (math.log(math.exp(s) + math.exp(0.6 * s)) - s) + (math.log(1 + math.exp(0.8 * s)) - 0.8 * s)
    t2i = (math.log(math.exp(s) + 1) - s) + (math.log(math.exp(0.6 * s) + math.exp(0.8 * s)) - 0.8 * s)
    expected = 0.5 * (i2t / 2 + t2i / 2)
    loss = contrastive_loss(image, text, torch.tensor(math.log(s)))
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32))


def test_scale_is_clamped_and_learnable() -> None:
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    at_max = contrastive_loss(image, text, torch.tensor(math.log(100.0)))
    torch.testing.assert_close(contrastive_loss(image, text, torch.tensor(20.0)), at_max)
    torch.testing.assert_close(contrastive_loss(image, text, torch.tensor(-5.0)),
                               contrastive_loss(image, text, torch.tensor(0.0)))
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    contrastive_loss(image, text, log_scale).backward()
    assert log_scale.grad is not None and log_scale.grad != 0


def test_head_aligns_matching_pairs() -> None:
    torch.manual_seed(0)
    head = ContrastiveHead(image_dim=12, text_dim=10, embed_dim=8)
    assert abs(head.temperature - 0.07) < 1e-6
    images, texts = torch.randn(16, 12), torch.randn(16, 10)
    opt = torch.optim.Adam(head.parameters(), lr=5e-2)
    first = head(images, texts).item()
    for _ in range(60):
        loss = head(images, texts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_masked_mean() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    torch.testing.assert_close(masked_mean(x, torch.tensor([[True, True, False]])), torch.tensor([[2.0]]))
