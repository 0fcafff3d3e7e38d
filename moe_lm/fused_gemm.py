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
a graph capture): ``bench/moe_fused_gemm.py`` times each on the device. The same policy as
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
DEFAULT_CONFIG = "128x128x64-w8-s3"


def set_fused_gemm(module: nn.Module, enabled: bool, config: str | None = None) -> None:
    """Turn the fused gate-up kernel on or off (and pick its tile config) in every submodule that
    has it (RoutedExperts), for A/B timing."""
    if config is not None and config not in CONFIGS:
        raise ValueError(f"unknown fused GEMM config {config!r}; choose one of {', '.join(CONFIGS)}")
    for m in module.modules():
        if hasattr(m, "fused_gemm"):
            m.fused_gemm = enabled
            if config is not None:
                m.fused_gemm_config = config


def gate_up_silu(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                 scale: torch.Tensor | None = None, config: str = DEFAULT_CONFIG) -> torch.Tensor | None:
    """silu(x[index] @ gate) * (x[index] @ up) * scale per row, grouped by expert, in one kernel.

    x: (T, C) token rows; index: (M,) int, the token of each expert-ordered row; offs: (E,) int32,
    the end row of each expert's group (as torch._grouped_mm takes it); w: (E, C, 2H), gate then up
    (RoutedExperts.w_gate_up, x's dtype); scale: (M,) or None. Returns h (M, H) in x's dtype, or
    None where the kernel does not run (``fused.use_triton``): the caller computes it eagerly."""
    x, index, offs = x.contiguous(), index.contiguous(), offs.contiguous()  # no-ops for the layer's tensors
    scale = None if scale is None else scale.contiguous()
    key = gate_up_silu_key(x, index, offs, w, scale, config)
    if not use_triton(key, x, index, offs, w, scale, numel=index.shape[0] * w.shape[-1]):
        return None
    return _launch((*key, x.device), lambda: _gate_up_silu_triton(x, index, offs, w, scale, CONFIGS[config]))


def gate_up_silu_key(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                     scale: torch.Tensor | None, config: str) -> tuple:
    """What Triton compiles a variant of the kernel for: the tile config, the dtypes, and for each
    integer argument whether it is 1 or a multiple of 16 and for each pointer whether it is
    16-byte aligned (it specialises on those)."""
    ints = (x.shape[1], w.shape[-1] // 2, x.stride(0), *w.stride())
    pointers = (x, index, offs, w) if scale is None else (x, index, offs, w, scale)
    return ("gate_up_silu", config, x.dtype, index.dtype, offs.dtype, None if scale is None else scale.dtype,
            tuple((i == 1, i % 16 == 0) for i in ints), tuple(t.data_ptr() % 16 == 0 for t in pointers))


def _gate_up_silu_triton(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                         scale: torch.Tensor | None, config: GemmConfig) -> torch.Tensor:
    (M,), (E, C, H2) = index.shape, w.shape
    H = H2 // 2
    out = torch.empty(M, H, dtype=x.dtype, device=x.device)
    tiles_m = triton.cdiv(M, config.block_m) + E  # at least the groups' row tiles, whatever their sizes
    grid = (tiles_m * triton.cdiv(H, config.block_n),)
    _gate_up_silu_kernel[grid](
        x, index, offs, w, scale if scale is not None else x, out, C, H, x.stride(0), *w.stride(),
        N_EXPERTS=E, EXPERTS_POW2=triton.next_power_of_2(E), HAS_SCALE=scale is not None,
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
                             n_width, n_hidden, stride_x, stride_we, stride_wk, stride_wn,
                             N_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr, HAS_SCALE: tl.constexpr,
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
        for k in range(0, tl.cdiv(n_width, BLOCK_K)):
            k_ok = ks < n_width - k * BLOCK_K
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
