"""The routed experts' gate-up stage as one Triton grouped GEMM: gather, two products, activation.

``gate_up_silu(x, index, offs, w, scale)`` computes, for each row r of the expert-ordered
assignments, ``silu(x[index[r]] @ w[e, :, :H]) * (x[index[r]] @ w[e, :, H:]) * scale[r]`` where e
is the expert whose group holds r. The eager path computes the same in three steps (gather the
token rows into expert order, one grouped GEMM to an (M, 2H) product, ``fused.silu_mul``) and
writes and reads back both intermediates; this kernel reads x's rows through ``index`` as it loads
them (no gathered copy) and applies the activation and router weight to its two fp32 accumulators
(no (M, 2H) product), writing only h (M, H) for the down GEMM.

The tile schedule is found on the device, so nothing here reads a device value on the host and
the kernel runs under CUDA-graph capture: the grid holds ceil(M / BLOCK_M) + E row tiles per
column block, more than the groups can use, and each program finds its expert and rows by a
prefix sum over the groups' tile counts (from ``offs``); the spare programs return at once.

Tile shapes are fixed per call by a key of ``CONFIGS`` (autotuning would compile and time during
a graph capture), by default by the number of rows (``config_for_rows``): ``bench/moe_fused_gemm.py``
times each on the device. The same policy as
``moe_lm.fused`` decides where the kernel runs (``fused.use_triton``: CUDA, no gradient, loaded
before a capture) and falls back to PyTorch, with one warning, where it cannot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lineinspect.moe_lm.fused import _launch, triton, use_triton

if triton is not None:
    import triton.language as tl


class GemmConfig(NamedTuple):
    """One tile shape of the kernel and how it is compiled."""

    block_m: int  # rows of one tile (token assignments)
    block_n: int  # hidden columns of one tile, for gate and for up each
    block_k: int  # width consumed per step
    group_m: int  # row tiles that walk the column blocks together (L2 reuse of the weight tiles)
    num_warps: int
    num_stages: int


# Two fp32 accumulators of BLOCK_M x BLOCK_N: 128 x 128 needs 8 warps (128 registers a thread for
# them); each stage of the pipeline holds one x tile and two weight tiles in shared memory
# (48 KB at 128 x 128 x 64 in bf16; an H100 has 227 KB a block).
CONFIGS: dict[str, GemmConfig] = {
    "128x128x64-w8-s3": GemmConfig(128, 128, 64, 8, 8, 3),
    "128x128x64-w8-s4": GemmConfig(128, 128, 64, 8, 8, 4),
    "128x64x64-w4-s4": GemmConfig(128, 64, 64, 8, 4, 4),
    "128x64x64-w4-s3": GemmConfig(128, 64, 64, 8, 4, 3),  # two blocks an SM (registers and shared memory)
    "64x128x64-w4-s4": GemmConfig(64, 128, 64, 8, 4, 4),
    "64x64x64-w4-s4": GemmConfig(64, 64, 64, 8, 4, 4),  # small groups (few tokens per expert)
}
# The fastest configs of bench/moe_fused_gemm.py on an H100 (session 21, l14 sizes: 16 experts, width
# 1024, hidden 2048): at 128 rows 64x128 tiles (0.061 ms; 128x128: 0.096), at 8,192 rows 128x128 with
# four stages (0.156 ms; 64x128: 0.187). 128-row tiles waste most of their rows once the 16 groups
# average under 128 rows, hence the switch at 2,048.
SMALL_CONFIG, LARGE_CONFIG, LARGE_FROM_ROWS = "64x128x64-w4-s4", "128x128x64-w8-s4", 2048


def config_for_rows(rows: int) -> str:
    """The default tile config for `rows` expert-ordered rows (top-k assignments)."""
    return LARGE_CONFIG if rows >= LARGE_FROM_ROWS else SMALL_CONFIG


def set_fused_gemm(module: nn.Module, enabled: bool, config: str | None = None) -> None:
    """Turn the fused gate-up kernel on or off (and fix its tile config; None keeps the current one) in
    every submodule that has it (RoutedExperts), for A/B timing."""
    if config is not None and config not in CONFIGS:
        raise ValueError(f"unknown fused GEMM config {config!r}; choose one of {', '.join(CONFIGS)}")
    for m in module.modules():
        if hasattr(m, "fused_gemm"):
            m.fused_gemm = enabled
            if config is not None:
                m.fused_gemm_config = config


def gate_up_silu(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                 scale: torch.Tensor | None = None, config: str | None = None) -> torch.Tensor | None:
    """silu(x[index] @ gate) * (x[index] @ up) * scale per row, grouped by expert, in one kernel.

    x: (T, C) token rows; index: (M,) int, the token of each expert-ordered row; offs: (E,) int32,
    the end row of each expert's group (as torch._grouped_mm takes it); w: (E, C, 2H), gate then up
    (RoutedExperts.w_gate_up, x's dtype); scale: (M,) or None; config: a key of CONFIGS, None for
    ``config_for_rows(M)``. Returns h (M, H) in x's dtype, or None where the kernel does not run
    (``fused.use_triton``): the caller computes it eagerly."""
    x, index, offs = x.contiguous(), index.contiguous(), offs.contiguous()  # no-ops for the layer's tensors
    scale = None if scale is None else scale.contiguous()
    config = config or config_for_rows(index.shape[0])
    key = gate_up_silu_key(x, index, offs, w, scale, config)
    if not use_triton(key, x, index, offs, w, scale, numel=index.shape[0] * w.shape[-1]):
        return None
    return _launch((*key, x.device), lambda: _gate_up_silu_triton(x, index, offs, w, scale, CONFIGS[config]))


def gate_up_silu_key(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                     scale: torch.Tensor | None, config: str) -> tuple:
    """What Triton compiles a variant of the kernel for: the tile config, the width (a compile-time
    constant: it bounds the K loop, and Triton 3.6's interpreter cannot loop to a runtime bound),
    the dtypes, and for each other integer argument whether it is 1 or a multiple of 16 and for each
    CUDA pointer whether it is 16-byte aligned (it specialises on those; other tensors carry no data it
    could run on, fake ones none at all)."""
    ints = (w.shape[-1] // 2, x.stride(0), *w.stride())
    pointers = (x, index, offs, w) if scale is None else (x, index, offs, w, scale)
    dtypes = (x.dtype, index.dtype, offs.dtype, None if scale is None else scale.dtype)
    aligned = tuple(not t.is_cuda or t.data_ptr() % 16 == 0 for t in pointers)
    return ("gate_up_silu", config, x.shape[1], *dtypes, tuple((i == 1, i % 16 == 0) for i in ints), aligned)


def _gate_up_silu_triton(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                         scale: torch.Tensor | None, config: GemmConfig) -> torch.Tensor:
    (M,), (E, C, H2) = index.shape, w.shape
    H = H2 // 2
    out = torch.empty(M, H, dtype=x.dtype, device=x.device)
    tiles_m = triton.cdiv(M, config.block_m) + E  # at least the groups' row tiles, whatever their sizes
    grid = (tiles_m * triton.cdiv(H, config.block_n),)
    _gate_up_silu_kernel[grid](
        x, index, offs, w, scale if scale is not None else x, out, H, x.stride(0), *w.stride(),
        WIDTH=C, N_EXPERTS=E, EXPERTS_POW2=triton.next_power_of_2(E), HAS_SCALE=scale is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


if triton is not None:

    @triton.jit
    def _tile_of(pid, n_hidden, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column block) of program pid: GROUP_M row tiles in a row take the column blocks
        together, so the weight tiles they share stay in L2."""
        tiles_n = tl.cdiv(n_hidden, BLOCK_N)
        tiles_m = tl.num_programs(0) // tiles_n
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

    @triton.jit
    def _gate_up_silu_kernel(x_ptr, index_ptr, offs_ptr, w_ptr, scale_ptr, out_ptr,
                             n_hidden, stride_x, stride_we, stride_wk, stride_wn,
                             WIDTH: tl.constexpr, N_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr,
                             HAS_SCALE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
        tile_m, tile_n = _tile_of(tl.program_id(0), n_hidden, BLOCK_M, BLOCK_N, GROUP_M)
        # The groups' row ranges and tile counts; the tile's expert is the number of groups whose
        # tiles all come before it.
        experts = tl.arange(0, EXPERTS_POW2)
        ends = tl.load(offs_ptr + experts, mask=experts < N_EXPERTS, other=0)
        starts = tl.load(offs_ptr + experts - 1, mask=(experts > 0) & (experts < N_EXPERTS), other=0)
        tiles = tl.cdiv(ends - starts, BLOCK_M)
        tiles_before = tl.cumsum(tiles, 0)
        if tile_m >= tl.sum(tiles, 0):  # a spare program
            return
        e = tl.sum((tiles_before <= tile_m).to(tl.int32), 0)
        mine = experts == e
        first_row = tl.sum(tl.where(mine, starts + (tile_m - tiles_before + tiles) * BLOCK_M, 0), 0)
        end_row = tl.sum(tl.where(mine, ends, 0), 0)

        rows = first_row + tl.arange(0, BLOCK_M)
        row_ok = rows < end_row
        token = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # the gather
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + token[:, None] * stride_x + ks[None, :]
        # columns past H wrap round to valid ones and are not stored: no mask on the weight loads' columns
        gate_tile = (w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk
                     + (cols % n_hidden)[None, :] * stride_wn)
        up_tile = gate_tile + n_hidden * stride_wn
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(WIDTH, BLOCK_K)):
            k_ok = ks < WIDTH - k * BLOCK_K
            a = tl.load(x_tile, mask=k_ok[None, :], other=0.0)
            gate = tl.dot(a, tl.load(gate_tile, mask=k_ok[:, None], other=0.0), acc=gate)
            up = tl.dot(a, tl.load(up_tile, mask=k_ok[:, None], other=0.0), acc=up)
            x_tile += BLOCK_K
            gate_tile += BLOCK_K * stride_wk
            up_tile += BLOCK_K * stride_wk

        h = gate * tl.sigmoid(gate) * up
        if HAS_SCALE:
            h = h * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out = out_ptr + rows.to(tl.int64)[:, None] * n_hidden + cols[None, :]
        tl.store(out, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < n_hidden)[None, :])
