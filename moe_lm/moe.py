"""The sparse MoE block: router -> grouped routed experts, plus always-on shared experts."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.experts import RoutedExperts, SwiGLU
from lineinspect.moe_lm.router import Router, RouterOutput


class MoEStats(NamedTuple):
    router_logits: torch.Tensor  # (N, E) float32
    counts: torch.Tensor  # (E,) long: assignments the router chose per expert; sums to N * top_k
    overflow: torch.Tensor  # (E,) long: of those, assignments over capacity (weight zeroed)


# At inference, while tokens x experts stays within this, every expert runs on every token
# (`MoEBlock._all_experts`): 16 experts, up to 256 tokens, which covers decoding steps.
DENSE_DISPATCH_ROWS = 4096


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert may take: ceil(factor * tokens * top_k / experts), at least 1."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


class MoEBlock(nn.Module):
    """x (B, T, C) -> (B, T, C): sum of top-k routed experts weighted by the router, plus shared experts.

    Dispatch, all on the device with static shapes (no host sync, so the block runs under a CUDA
    graph): the N * k (token, slot) assignments are sorted by expert (stable, so within an expert the
    earlier token in flattened B*T order comes first); each group's bounds are searched in the
    sorted experts; the token rows are gathered in that order and all experts run grouped. The
    results go back to (token, slot) order through the inverse permutation (a gather, not an
    atomic scatter-add), and each token's k rows are weighted and added onto the shared experts'
    output element-wise. At inference with few tokens (decoding steps, tokens x experts <=
    `dense_dispatch_rows`) every expert runs on every token instead, with no sort at all. On a GPU
    at inference the shared experts run on a side stream while the routing and experts run.

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
        self.overlap_shared = True  # side stream for the shared experts (CUDA, no autograd); off for A/B timing
        self.dense_dispatch_rows = DENSE_DISPATCH_ROWS  # 0 = always sorted dispatch (A/B timing)
        self._side_stream: torch.cuda.Stream | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the side stream behind (a CUDA stream cannot be copied); the
        copy makes its own on first use."""
        state = dict(super().__getstate__())
        state["_side_stream"] = None
        return state

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        side = self._shared_stream(flat)
        if side is not None:  # the shared experts overlap the routing below
            side.wait_stream(torch.cuda.current_stream(flat.device))
            with torch.cuda.stream(side):
                shared = self.shared(flat)
        route = self.router(flat)
        if not self.training and N * E <= self.dense_dispatch_rows:
            picked, counts = self._all_experts(flat, route.indices)
            overflow, weight = torch.zeros_like(counts), route.weights
        else:
            picked, counts, overflow, keep = self._grouped(flat, route)
            weight = route.weights if keep is None else route.weights * keep
        if self.shared is None:
            out = None
        elif side is None:
            out = self.shared(flat).to(picked.dtype)
        else:
            torch.cuda.current_stream(flat.device).wait_stream(side)
            out = shared.to(picked.dtype)
        w = weight.to(picked.dtype)
        for j in range(k):  # out + sum_j w_j * y_j, element-wise (a batched (1 x k) product ran as a slow gemv)
            y, wj = picked[:, j], w[:, j, None]
            out = y * wj if out is None else torch.addcmul(out, y, wj)
        return out.view(B, T, C), MoEStats(route.logits, counts, overflow)

    def _grouped(self, flat: torch.Tensor, route: RouterOutput
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sorted dispatch to the grouped experts -> (N, k, C) expert outputs per (token, slot), the
        per-expert counts (E,) and overflow (E,), and in training with a capacity the (N, k) mask
        of the assignments kept (None otherwise)."""
        N, C = flat.shape
        k, E = self.top_k, self.n_experts
        # int32 keys: half the radix-sort passes of int64
        expert, order = route.indices.reshape(-1).to(torch.int32).sort(stable=True)  # (M = N * k,)
        groups = torch.arange(E + 1, device=flat.device, dtype=torch.int32)
        bounds = torch.searchsorted(expert, groups, out_int32=True)  # (E + 1,) group starts, M
        counts = (bounds[1:] - bounds[:-1]).long()  # (E,)
        positions = torch.arange(N * k, device=flat.device)
        inverse = torch.empty_like(order).scatter_(0, order, positions)  # sorted row of each assignment
        overflow, keep = torch.zeros_like(counts), None
        if self.training and self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, N, k, E)
            rank = positions - bounds.index_select(0, expert)  # place in its group, sorted order
            keep = (rank < capacity).index_select(0, inverse).view(N, k)
            overflow = (counts - capacity).clamp(min=0)
        y = self.experts(flat.index_select(0, order // k), bounds[1:])  # (M, C), sorted order
        return y.index_select(0, inverse).view(N, k, C), counts, overflow, keep

    def _all_experts(self, flat: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Few tokens (decoding): every expert on every token as batched products, then each
        token's k picked -> (N, k, C), per-expert counts. E/k times the FLOPs, but at a few dozen
        tokens the experts' weights are read once either way and no sort or scatter runs."""
        N, E = flat.shape[0], self.n_experts
        y = self.experts.all_tokens(flat)  # (E, N, C)
        picked = y[indices, torch.arange(N, device=flat.device)[:, None]]  # (N, k, C)
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(
            0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))
        return picked, counts

    def _shared_stream(self, flat: torch.Tensor) -> torch.cuda.Stream | None:
        """The side stream for the shared experts, where it pays and is safe: CUDA, no autograd."""
        if self.shared is None or not self.overlap_shared or not flat.is_cuda or torch.is_grad_enabled():
            return None
        if self._side_stream is None or self._side_stream.device != flat.device:
            self._side_stream = torch.cuda.Stream(flat.device)
        return self._side_stream
