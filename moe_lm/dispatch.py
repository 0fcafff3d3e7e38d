"""Dispatch: from the router's choices to the expert-ordered rows the grouped experts run on.

``count_dispatch(indices, weights, n_experts)`` is the eager form (every device, training and its
capacity). ``route_and_dispatch(logits, top_k, n_experts, bias)`` does the router's selection and
the dispatch together in two Triton kernels at inference on CUDA, where the eager form's dozen
small kernels (top-k, softmax of the chosen, a one-hot scan, gathers, the inverse permutation)
cost ~50 us of an l14 MoE layer at 4,096 tokens on an H100; they are tiny and serial, so on a GPU
busy with GEMMs their count, not their arithmetic, is what costs. ``torch.compile`` could fuse them,
but compiles per token count on the serving path (see ``moe_lm.fused``).

Both give the same `Dispatch`: within an expert the earlier (token, slot) comes first, so the
order does not depend on how the work was split.

The kernels: the first, one program per block of tokens, picks each token's top k (with a
balancing bias: by probability plus bias, as ``Router``), weighs the k by the softmax of their
logits, and ranks each assignment within its block and expert by a scan of the one-hot choices,
writing the block's per-expert counts. The second, one program per block too, adds the counts of
the earlier blocks and of the smaller experts to each rank (its row) and writes the rows' tokens
and weights; its first program writes the groups' ends and the counts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lineinspect.moe_lm.fused import _launch, triton, use_triton

if triton is not None:
    import triton.language as tl

BLOCK_TOKENS = 128  # tokens per program; its one-hot scan holds BLOCK_TOKENS * k * experts (pow. 2) values
# The second kernel reads every block's counts as one tile (blocks x experts, powers of two): up to
# 1,024 blocks, 131,072 tokens. Larger batches take the eager path.
MAX_BLOCKS = 1024


class Dispatch(NamedTuple):
    token: torch.Tensor  # (M = N * k,) int: the token of each expert-ordered row
    scale: torch.Tensor  # (M,) float32: that row's router weight
    ends: torch.Tensor  # (E,) int32: the end row of each expert's group
    counts: torch.Tensor  # (E,) long: assignments per expert
    row_of: torch.Tensor  # (N, k) int: the row of each token's assignments


def count_dispatch(indices: torch.Tensor, weights: torch.Tensor, n_experts: int,
                   capacity: int | None = None) -> tuple[Dispatch, torch.Tensor]:
    """The expert-ordered rows of the (N, k) choices and their weights, and the overflow (E,) per
    expert past `capacity` (those rows keep their place with weight 0).

    An assignment's place in its expert's group is the number of earlier assignments to that
    expert: a running count over the one-hot choices (E x M, a few small kernels; a radix sort of
    the expert ids cost ~25 us at 8,192 assignments on an H100)."""
    (N, k), E = indices.shape, n_experts
    M = N * k
    expert = indices.reshape(-1)  # (M,) in (token, slot) order
    # (E, M), scanned along its inner dim: the scan along an outer dim of (M, E) ran one thread per
    # column, 1.4 ms at 8,192 assignments on an H100
    chosen = torch.zeros(E, M, dtype=torch.int32, device=indices.device).scatter_(0, expert[None], 1)
    seen = chosen.cumsum(1, dtype=torch.int32)  # (E, M): assignments to each expert so far
    counts = seen[:, -1].long()  # (E,)
    rank = seen.gather(0, expert[None]).squeeze(0) - 1  # (M,) place in its expert's group
    ends = counts.cumsum(0)  # (E,) end row of each group
    row_of = (ends - counts).index_select(0, expert) + rank  # (M,)
    order = torch.empty_like(row_of).scatter_(0, row_of, torch.arange(M, device=indices.device))  # inverse
    weight, overflow = weights.reshape(-1), torch.zeros_like(counts)
    if capacity is not None:
        weight = weight * (rank < capacity)
        overflow = (counts - capacity).clamp(min=0)
    dispatch = Dispatch(order // k, weight.index_select(0, order), ends.to(torch.int32), counts, row_of.view(N, k))
    return dispatch, overflow


def route_and_dispatch(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> Dispatch | None:
    """The router's top-k of `logits` (N, E) float32 and their dispatch in Triton; None where the
    kernels do not run (CPU, a gradient, no Triton, a failed first launch): use the eager path."""
    N, E = logits.shape
    if triton is None or N == 0 or triton.cdiv(N, BLOCK_TOKENS) > MAX_BLOCKS:
        return None
    key = ("route_dispatch", top_k, E, bias is not None, triton.next_power_of_2(triton.cdiv(N, BLOCK_TOKENS)))
    if not use_triton(key, logits, bias, numel=N * E * 64):  # ~12 eager kernels: pays like large work
        return None
    return _launch((*key, logits.device), lambda: _route_dispatch_triton(logits.contiguous(), top_k, bias))


def _route_dispatch_triton(logits: torch.Tensor, k: int, bias: torch.Tensor | None) -> Dispatch:
    (N, E), dev = logits.shape, logits.device
    blocks = triton.cdiv(N, BLOCK_TOKENS)
    experts_pow2, slots_pow2 = triton.next_power_of_2(E), triton.next_power_of_2(k)
    expert = torch.empty(N * k, dtype=torch.int32, device=dev)
    weight = torch.empty(N * k, dtype=torch.float32, device=dev)
    rank = torch.empty(N * k, dtype=torch.int32, device=dev)
    block_counts = torch.empty(blocks, E, dtype=torch.int32, device=dev)
    _choose_kernel[(blocks,)](logits, bias if bias is not None else logits, expert, weight, rank, block_counts, N,
                              N_EXPERTS=E, EXPERTS_POW2=experts_pow2, K=k, K_POW2=slots_pow2,
                              HAS_BIAS=bias is not None, BLOCK=BLOCK_TOKENS)
    token = torch.empty(N * k, dtype=torch.int32, device=dev)
    scale = torch.empty(N * k, dtype=torch.float32, device=dev)
    row_of = torch.empty(N * k, dtype=torch.int32, device=dev)
    ends = torch.empty(E, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    _place_kernel[(blocks,)](expert, weight, rank, block_counts, token, scale, row_of, ends, counts, N, blocks,
                             N_EXPERTS=E, EXPERTS_POW2=experts_pow2, K=k, TOKENS=BLOCK_TOKENS,
                             SLOTS_POW2=BLOCK_TOKENS * slots_pow2, BLOCKS_POW2=triton.next_power_of_2(blocks))
    return Dispatch(token, scale, ends, counts, row_of.view(N, k))


if triton is not None:

    @triton.jit
    def _choose_kernel(logits_ptr, bias_ptr, expert_ptr, weight_ptr, rank_ptr, block_counts_ptr, n_tokens,
                       N_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        block = tl.program_id(0)
        tokens = block * BLOCK + tl.arange(0, BLOCK)
        token_ok = tokens < n_tokens
        cols = tl.arange(0, EXPERTS_POW2)
        col_ok = cols < N_EXPERTS
        logit = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * N_EXPERTS + cols[None, :],
                        mask=token_ok[:, None] & col_ok[None, :], other=-1e30)  # finite: no NaN in padding rows
        score = logit  # top-k of the logits = top-k of the probabilities
        if HAS_BIAS:
            top = tl.max(logit, 1)
            p = tl.exp(logit - top[:, None])
            p = p / tl.sum(p, 1)[:, None]
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
            score = tl.where(col_ok[None, :], p + bias[None, :], -1e30)
        slots = tl.arange(0, K_POW2)
        chosen = tl.full((BLOCK, K_POW2), EXPERTS_POW2, tl.int32)  # padding slots choose no expert
        chosen_logit = tl.full((BLOCK, K_POW2), float("-inf"), tl.float32)
        for j in tl.static_range(K):  # the highest score left, lowest column among ties
            best = tl.max(score, 1)
            col = tl.min(tl.where(score == best[:, None], cols[None, :], EXPERTS_POW2), 1)
            hit = cols[None, :] == col[:, None]
            chosen = tl.where(slots[None, :] == j, col[:, None], chosen)
            chosen_logit = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, logit, 0.0), 1)[:, None], chosen_logit)
            score = tl.where(hit, float("-inf"), score)
        # the chosen logits' softmax = their probabilities renormalised
        w = tl.exp(chosen_logit - tl.max(chosen_logit, 1)[:, None])
        w = w / tl.sum(w, 1)[:, None]
        out = tokens[:, None] * K + slots[None, :]
        out_ok = token_ok[:, None] & (slots[None, :] < K)
        tl.store(expert_ptr + out, chosen, mask=out_ok)
        tl.store(weight_ptr + out, w, mask=out_ok)
        # rank within the block and expert, in (token, slot) order
        flat = tl.reshape(tl.where(out_ok, chosen, EXPERTS_POW2), [BLOCK * K_POW2])
        one_hot = (flat[:, None] == cols[None, :]).to(tl.int32)  # (BLOCK * K_POW2, EXPERTS_POW2)
        before = tl.cumsum(one_hot, 0) - one_hot
        rank = tl.sum(before * one_hot, 1)
        flat_out = tl.reshape(out, [BLOCK * K_POW2])
        tl.store(rank_ptr + flat_out, rank, mask=tl.reshape(out_ok, [BLOCK * K_POW2]))
        tl.store(block_counts_ptr + block * N_EXPERTS + cols, tl.sum(one_hot, 0), mask=col_ok)

    @triton.jit
    def _place_kernel(expert_ptr, weight_ptr, rank_ptr, block_counts_ptr, token_ptr, scale_ptr, row_of_ptr,
                      ends_ptr, counts_ptr, n_tokens, n_blocks,
                      N_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr, K: tl.constexpr, TOKENS: tl.constexpr,
                      SLOTS_POW2: tl.constexpr, BLOCKS_POW2: tl.constexpr):
        block = tl.program_id(0)
        cols = tl.arange(0, EXPERTS_POW2)
        col_ok = cols < N_EXPERTS
        # every block's counts as one tile (no loop with a run-time bound: Triton 3.6's interpreter
        # cannot run one)
        blocks = tl.arange(0, BLOCKS_POW2)
        c = tl.load(block_counts_ptr + blocks[:, None] * N_EXPERTS + cols[None, :],
                    mask=(blocks < n_blocks)[:, None] & col_ok[None, :], other=0)
        earlier = tl.sum(tl.where((blocks < block)[:, None], c, 0), 0)  # each expert's rows in earlier blocks
        total = tl.sum(c, 0)
        ends = tl.cumsum(total, 0)
        base = ends - total + earlier  # (E,) the first row of this block's assignments to each expert
        if block == 0:
            tl.store(ends_ptr + cols, ends, mask=col_ok)
            tl.store(counts_ptr + cols, total.to(tl.int64), mask=col_ok)
        # the block's TOKENS * K assignments, in a power-of-two range
        slot = tl.arange(0, SLOTS_POW2)
        a = block * TOKENS * K + slot
        a_ok = (slot < TOKENS * K) & (a < n_tokens * K)
        e = tl.load(expert_ptr + a, mask=a_ok, other=0)
        row = tl.sum(tl.where(e[:, None] == cols[None, :], base[None, :], 0), 1) + tl.load(rank_ptr + a, mask=a_ok)
        tl.store(row_of_ptr + a, row, mask=a_ok)
        tl.store(token_ptr + row, a // K, mask=a_ok)
        tl.store(scale_ptr + row, tl.load(weight_ptr + a, mask=a_ok), mask=a_ok)
