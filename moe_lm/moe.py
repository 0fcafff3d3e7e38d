"""The sparse MoE block: router -> grouped routed experts, plus always-on shared experts."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.experts import RoutedExperts, SwiGLU
from lineinspect.moe_lm.router import Router


class MoEStats(NamedTuple):
    router_logits: torch.Tensor  # (N, E) float32
    counts: torch.Tensor  # (E,) long: assignments the router chose per expert; sums to N * top_k
    overflow: torch.Tensor  # (E,) long: of those, assignments over capacity (not computed)


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert may take: ceil(factor * tokens * top_k / experts), at least 1."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


class MoEBlock(nn.Module):
    """x (B, T, C) -> (B, T, C): sum of top-k routed experts weighted by the router, plus shared experts.

    Dispatch: the (token, slot) assignments are sorted by expert (stable, so within an expert the
    earlier token in flattened B*T order comes first), the token rows are gathered in that order,
    all experts run grouped, and the weighted results are added back per token.

    Capacity (training only): an expert keeps its first `capacity` assignments. The rest are
    counted in `MoEStats.overflow`; their tokens still receive the shared experts and whatever
    other routed experts had room, so no token leaves the block without an FFN update.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.top_k
        self.capacity_factor = config.capacity_factor
        self.router = Router(config.width, self.n_experts, self.top_k, balance_bias=config.balance == "bias")
        self.experts = RoutedExperts(
            self.n_experts, config.width, config.expert_hidden, config.expert_dropout, config.expert_impl
        )
        # n shared experts of hidden h are one SwiGLU of hidden n * h (same function, one matmul).
        shared_hidden = config.n_shared_experts * (config.shared_expert_hidden or config.expert_hidden)
        self.shared = SwiGLU(config.width, shared_hidden) if config.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        route = self.router(flat)

        expert_of = route.indices.reshape(-1)  # (N * k,), token-major
        order = torch.argsort(expert_of, stable=True)  # assignment ids sorted by expert
        counts = torch.bincount(expert_of, minlength=E)  # (E,)
        group_sizes = counts
        if self.training and self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, N, k, E)
            starts = counts.cumsum(0) - counts
            rank = torch.arange(N * k, device=x.device) - starts[expert_of[order]]  # place in its group
            order = order[rank < capacity]
            group_sizes = counts.clamp(max=capacity)
        overflow = counts - group_sizes

        token = order // k  # (M,) token of each kept assignment
        y = self.experts(flat[token], group_sizes)  # (M, C)
        y = y * route.weights.reshape(-1)[order].to(y.dtype)[:, None]
        out = flat.new_zeros(N, C, dtype=y.dtype).index_add(0, token, y)  # (N, C)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, C), MoEStats(route.logits, counts, overflow)
