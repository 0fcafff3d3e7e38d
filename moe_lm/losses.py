"""Decoder losses as pure functions, computed once at the top from per-layer router logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target value that the LM loss skips (padding, prompt tokens)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32. logits: (B, T, V); targets: (B, T) long."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _masked_mean(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of x (L, N, ...) counting only tokens where token_mask (N,) is True."""
    if token_mask is None:
        return x.mean(dim=1)
    m = token_mask.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral balance loss, averaged over layers: E * sum_e f_e * P_e.

    router_logits: per layer (N, E); token_mask: (N,) bool, False for padding.
    f_e is the fraction of the top-k assignments that go to expert e (sums to 1) and P_e the mean
    router probability of e. Perfectly uniform routing gives exactly 1; collapse onto top_k experts
    with confident probabilities gives up to E / top_k. The gradient flows through P only.
    """
    logits = torch.stack([lg.float() for lg in router_logits])  # (L, N, E)
    E = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # (L, N, k)
    assigned = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)  # (L, N, E), k ones per token
    f = _masked_mean(assigned, token_mask) / top_k  # (L, E)
    p = _masked_mean(probs, token_mask)  # (L, E)
    return (E * (f * p).sum(dim=-1)).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over layers and tokens of logsumexp(logits)^2. router_logits: per layer (N, E)."""
    logits = torch.stack([lg.float() for lg in router_logits])  # (L, N, E)
    z = torch.logsumexp(logits, dim=-1) ** 2  # (L, N)
    return _masked_mean(z, token_mask).mean()
