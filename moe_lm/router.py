"""Top-k router: linear scores, softmax in float32, renormalised top-k weights and expert indices."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (N, E) float32, before any balancing bias (the losses read these)
    weights: torch.Tensor  # (N, k) float32, renormalised to sum to 1 per token
    indices: torch.Tensor  # (N, k) long, chosen experts


class Router(nn.Module):
    """Scores tokens against experts. With ``balance_bias`` (DeepSeek-V3's auxiliary-loss-free
    balancing) a non-gradient per-expert bias shifts which experts are *selected*; the mixing
    weights still come from the unbiased probabilities. The bias changes only through
    ``update_bias``, which the training step calls; forward never mutates state."""

    def __init__(self, width: int, n_experts: int, top_k: int, balance_bias: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.proj = nn.Linear(width, n_experts, bias=False)
        self.balance_bias: torch.Tensor | None
        if balance_bias:
            self.register_buffer("balance_bias", torch.zeros(n_experts))
        else:
            self.balance_bias = None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: (N, C)."""
        return self.select(self.scores(x))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C) -> the logits (N, E) in float32."""
        return self.proj(x).float()

    def select(self, logits: torch.Tensor) -> RouterOutput:
        """The top-k experts of each row of `logits` (N, E) and their renormalised weights."""
        if self.balance_bias is None:
            # The top-k of the logits are those of the probabilities, and the softmax of the chosen
            # logits is their renormalised probabilities: two small kernels instead of five.
            top = logits.topk(self.top_k, dim=-1)
            return RouterOutput(logits, top.values.softmax(dim=-1), top.indices)
        probs = logits.softmax(dim=-1)
        indices = (probs + self.balance_bias).topk(self.top_k, dim=-1).indices  # (N, k)
        weights = probs.gather(-1, indices)
        return RouterOutput(logits, weights / weights.sum(dim=-1, keepdim=True), indices)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones by `rate`.
        counts: (E,) assignments per expert in the last step."""
        if self.balance_bias is None:
            return
        load = counts.to(self.balance_bias)
        self.balance_bias += rate * torch.sign(load.mean() - load)
