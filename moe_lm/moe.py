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
    overflow: torch.Tensor  # (E,) long: of those, assignments over capacity (weight zeroed)


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert may take: ceil(factor * tokens * top_k / experts), at least 1."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


class MoEBlock(nn.Module):
    """x (B, T, C) -> (B, T, C): sum of top-k routed experts weighted by the router, plus shared experts.

    Dispatch, all on the device with static shapes (no host sync, so the block runs under a CUDA
    graph): the N * k (token, slot) assignments are sorted by expert (stable, so within an expert the
    earlier token in flattened B*T order comes first); each group's bounds are searched in the
    sorted experts; the token rows are gathered in that order, all experts run grouped, and the
    weighted results are added per token onto the shared experts' output.

    Capacity (training only): an expert keeps its first `capacity` assignments. The rest are
    counted in `MoEStats.overflow` and their router weight is zeroed: they still flow through the
    grouped GEMMs (dropping them would make the shapes depend on the data) but add nothing to the
    output and get no gradient. Their tokens still receive the shared experts and whatever other
    routed experts had room, so no token leaves the block without an FFN update.
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

        expert, order = route.indices.reshape(-1).sort(stable=True)  # (M = N * k,) experts; assignment ids
        bounds = torch.searchsorted(expert, torch.arange(E + 1, device=x.device))  # (E + 1,) group starts, M
        counts = bounds[1:] - bounds[:-1]  # (E,)
        weight = route.weights.reshape(-1).index_select(0, order)  # (M,) float32
        if self.training and self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, N, k, E)
            rank = torch.arange(N * k, device=x.device) - bounds.index_select(0, expert)  # place in its group
            weight = weight * (rank < capacity)
            overflow = (counts - capacity).clamp(min=0)
        else:
            overflow = torch.zeros_like(counts)

        token = order // k  # (M,) token of each assignment
        y = self.experts(flat.index_select(0, token), bounds[1:].to(torch.int32))  # (M, C)
        y = y * weight.to(y.dtype)[:, None]
        out = self.shared(flat) if self.shared is not None else flat.new_zeros(N, C, dtype=y.dtype)
        out = out.index_add_(0, token, y.to(out.dtype))  # (N, C)
        return out.view(B, T, C), MoEStats(route.logits, counts, overflow)
