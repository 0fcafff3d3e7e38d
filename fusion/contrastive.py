"""Contrastive image-text alignment: symmetric InfoNCE with a learnable, clamped temperature.

The loss is a pure function; ``ContrastiveHead`` only holds the projection heads and the
log-parameterised scale (1 / temperature). The scale is clamped inside the computation, never by
editing the parameter, so the head stays stateless between calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.errors import LineInspectError


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, log_scale: torch.Tensor, max_scale: float = 100.0
) -> torch.Tensor:
    """Symmetric InfoNCE. image_emb, text_emb: (B, D), row i of each is a matching pair.

    Embeddings are L2-normalised; logits = scale * cosine similarity with scale = exp(log_scale)
    clamped to [1, max_scale] (temperature in [1 / max_scale, 1]). Returns the mean of the
    image->text and text->image cross-entropies.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise LineInspectError(
            f"contrastive loss: need two (B, D) tensors of one shape, got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    scale = log_scale.float().clamp(0.0, math.log(max_scale)).exp()
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = scale * img @ txt.t()  # (B, B): image i vs text j
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Pool tokens: x (B, T, C), mask (B, T) bool or None -> (B, C) mean over valid tokens."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class ContrastiveHead(nn.Module):
    """Projects pooled image and text features into one space and holds the temperature."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, init_temperature: float = 0.07,
                 max_scale: float = 100.0) -> None:
        super().__init__()
        if not 1.0 / max_scale <= init_temperature <= 1.0:
            raise LineInspectError(f"contrastive head: init_temperature must be in [{1 / max_scale}, 1]")
        self.max_scale = max_scale
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def temperature(self) -> float:
        return 1.0 / min(max(math.exp(float(self.log_scale.detach())), 1.0), self.max_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """image_features: (B, D_img) pooled; text_features: (B, D_text) pooled -> scalar loss."""
        return contrastive_loss(
            self.image_proj(image_features), self.text_proj(text_features), self.log_scale, self.max_scale
        )
