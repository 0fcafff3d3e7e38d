"""The sparse MoE block: router -> grouped routed experts, plus always-on shared experts."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.dispatch import count_dispatch, route_and_dispatch
from lineinspect.moe_lm.experts import RoutedExperts, SwiGLU
from lineinspect.moe_lm.fused import gather_sum
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
    graph): the N * k (token, slot) assignments are placed in expert order by counting (within an
    expert the earlier token in flattened B*T order comes first; `moe_lm.dispatch`, two Triton
    kernels with the router's top-k at inference on CUDA); the token rows are gathered in
    that order (or read in place by `moe_lm.fused_gemm`'s kernel) and all experts run grouped, each
    row's router weight folded into its expert's hidden activation. The outputs go back to token
    order by a gather (not an atomic scatter-add) and each token's k rows are summed onto the shared
    experts' output (`moe_lm.fused`: one Triton kernel each for the activation and the return at
    inference on CUDA). At inference with few
    tokens (decoding steps, tokens x experts <= `dense_dispatch_rows`) every expert runs on every
    token instead, with no dispatch at all. On a GPU at
    inference the shared experts run on a side stream while the routing and experts run.

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
        self.fused_kernels = True  # Triton dispatch and gather-and-sum at inference on CUDA; off for A/B timing
        self.fused_dispatch = True  # of those, the route-and-dispatch kernels alone (A/B timing)
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
        N, E = flat.shape[0], self.n_experts
        side = self._shared_stream(flat)
        shared = None
        if side is not None:  # the shared experts overlap the routing and routed experts below
            side.wait_stream(torch.cuda.current_stream(flat.device))
            with torch.cuda.stream(side):
                shared = self.shared(flat)
        elif self.shared is not None:
            shared = self.shared(flat)
        logits = self.router.scores(flat)
        few = not self.training and N * E <= self.dense_dispatch_rows
        if few:
            routed, counts, overflow = self._all_experts(flat, self.router.select(logits))
        else:
            rows, row_of, counts, overflow = self._grouped(flat, logits)
        if side is not None:
            torch.cuda.current_stream(flat.device).wait_stream(side)
        if few:
            out = routed if shared is None else routed + shared.to(routed.dtype)
        else:
            out = gather_sum(shared, rows, row_of, self.fused_kernels)
        return out.view(B, T, C), MoEStats(logits, counts, overflow)

    def _grouped(self, flat: torch.Tensor, logits: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route and dispatch (``moe_lm.dispatch``), then the grouped experts -> the (M = N * k, C)
        weighted expert outputs in expert order, the (N, k) row of each token's assignments there,
        and the per-expert counts (E,) and overflow (E,)."""
        N, E, k = flat.shape[0], self.n_experts, self.top_k
        dispatch = None
        if self.fused_kernels and self.fused_dispatch and not self.training:
            dispatch = route_and_dispatch(logits, k, self.router.balance_bias)
        if dispatch is None:
            capacity = None
            if self.training and self.capacity_factor is not None:
                capacity = expert_capacity(self.capacity_factor, N, k, E)
            route = self.router.select(logits)
            dispatch, overflow = count_dispatch(route.indices, route.weights, E, capacity)
        else:
            overflow = torch.zeros_like(dispatch.counts)
        rows = self.experts(flat, dispatch.ends, dispatch.scale, index=dispatch.token)
        return rows, dispatch.row_of, dispatch.counts, overflow

    def _all_experts(self, flat: torch.Tensor, route: RouterOutput
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Few tokens (decoding): every expert on every token as batched products, no dispatch ->
        the router-weighted sum of each token's picks (N, C), per-expert counts, no overflow. E/k
        times the FLOPs, but at a few dozen tokens the experts' weights are read once either way;
        the whole step is a handful of kernels, which is what eager decoding is bound by."""
        N, E = flat.shape[0], self.n_experts
        y = self.experts.all_tokens(flat)  # (E, N, C)
        scale = torch.zeros(E, N, device=flat.device, dtype=y.dtype).scatter_(
            0, route.indices.t(), route.weights.t().to(y.dtype))  # (E, N), zero where not picked
        routed = (y * scale[:, :, None]).sum(0)  # (N, C)
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(
            0, route.indices.reshape(-1), torch.ones_like(route.indices.reshape(-1)))
        return routed, counts, torch.zeros_like(counts)

    def _shared_stream(self, flat: torch.Tensor) -> torch.cuda.Stream | None:
        """The side stream for the shared experts, where it pays and is safe: CUDA, no autograd."""
        if self.shared is None or not self.overlap_shared or not flat.is_cuda or torch.is_grad_enabled():
            return None
        if self._side_stream is None or self._side_stream.device != flat.device:
            self._side_stream = torch.cuda.Stream(flat.device)
        return self._side_stream
