"""The MoE block's element-wise steps, each fused into one Triton kernel on CUDA at inference.

* ``silu_mul(gate, up, scale)``: ``silu(gate) * up * scale[row]``, the SwiGLU activation with each
  row's router weight folded in (the down projection is linear, so weighting its input weights its
  output).
* ``gather_sum(base, rows, index)``: ``base[n] + sum_j rows[index[n, j]]``, the experts' outputs
  returned to token order and added onto the shared experts' output.

Eager PyTorch computes the same everywhere else (CPU, training, no Triton) and is the test oracle.
The Triton kernels run only where no gradient is needed, so they need no backward.

Why by hand: eager PyTorch runs silu and the product as two kernels (one more write and read of
the hidden activations: on an H100 at 4,096 tokens silu, product and weighting cost ~110 us of a
~530 us MoE layer), and the gather and weighted sum as three. ``torch.compile`` would fuse them,
but it compiles per input shape on the serving path (decoding changes the token count each
request) and needs a C++ toolchain on CPUs; these two kernels compile once per dtype, in about a
second, on first use. Only CUDA tensors take them, and only where they pay (``use_triton``);
``TRITON_INTERPRET=1`` runs them on CPU tensors for the tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: eager everywhere
    triton = None

BLOCK = 1024  # columns per program: C and H of the presets are multiples of it or smaller
# Outside CUDA-graph capture a Triton launch costs ~20-30 us more host time than a PyTorch kernel's;
# eager decoding steps are bound by launches, so there the saved pass over memory does not pay
# (l14 decoding on an H100: 13.8 ms a step with Triton, 12.7 without). It does pay once the work
# keeps the GPU busier than the host: 8M elements (16 MB in bf16, ~5 us of memory traffic per pass).
EAGER_MIN_ELEMENTS = 1 << 23
# Kernel variants (name, device, dtype, flags, strides) already compiled and loaded in this process.
# Loading a module is not allowed while a CUDA graph is being captured, so a capture uses a variant
# only if an eager call (the warm-up every capture starts with) has loaded it: eager calls load each
# variant on first sight, whatever their size. A fact about the process, like a compile cache.
_loaded: set[tuple] = set()
# Variants whose first launch failed here (a GPU this Triton cannot compile for, no C compiler for its
# launcher): computed eagerly from then on, after one warning.
_failed: set[tuple] = set()


def use_triton(key: tuple, *tensors: torch.Tensor | None, numel: int) -> bool:
    """Whether the Triton kernel variant `key` runs on these tensors: Triton installed, CUDA
    tensors, no gradient to compute through them; then, while a CUDA graph is captured, if the
    variant is loaded (launch costs vanish on replay), and otherwise if `numel` elements of work
    reach EAGER_MIN_ELEMENTS or the variant is not loaded yet. Asking changes nothing."""
    present = [t for t in tensors if t is not None]
    if triton is None or not present[0].is_cuda:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    variant = (*key, present[0].device)
    if variant in _failed:
        return False
    loaded = variant in _loaded
    if torch.cuda.is_current_stream_capturing():
        return loaded
    return numel >= EAGER_MIN_ELEMENTS or not loaded


def set_fused_kernels(module: nn.Module, enabled: bool) -> None:
    """Turn the Triton kernels on or off in every submodule that has them (off for A/B timing)."""
    for m in module.modules():
        if hasattr(m, "fused_kernels"):
            m.fused_kernels = enabled


def silu_mul(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None,
             fused: bool = True) -> torch.Tensor:
    """silu(gate) * up, times scale per row if given. gate, up: (..., H), last dim contiguous;
    scale: gate.shape[:-1]. Returns a new contiguous (..., H) tensor in gate's dtype."""
    key = silu_mul_key(gate.dtype, scale is not None, gate.shape[-1], gate.stride(-2), up.stride(-2))
    if fused and use_triton(key, gate, up, scale, numel=gate.numel()):
        out = _launch((*key, gate.device), lambda: _silu_mul_triton(gate, up, scale))
        if out is not None:
            return out
    h = F.silu(gate) * up
    return h if scale is None else h * scale.unsqueeze(-1).to(h.dtype)


def gather_sum(base: torch.Tensor | None, rows: torch.Tensor, index: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """base + rows[index].sum(1): base (N, C) or None, rows (M, C), index (N, k) int -> (N, C) in rows' dtype."""
    key = ("gather_sum", rows.dtype, base is not None, index.shape[1], rows.shape[-1] % 16)
    if fused and use_triton(key, base, rows, numel=index.numel() * rows.shape[-1]):
        out = _launch((*key, rows.device), lambda: _gather_sum_triton(base, rows, index))
        if out is not None:
            return out
    N, k = index.shape
    out = rows.index_select(0, index.reshape(-1)).view(N, k, -1).sum(1)
    return out if base is None else base.to(rows.dtype) + out


def _launch(variant: tuple, launch: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Run a Triton kernel variant; None if its first launch fails here (recorded in _failed, with a
    warning), so the caller computes eagerly. A variant that has run before and fails is a real error."""
    try:
        out = launch()
    except Exception as exc:  # Triton's compile and load errors have no common base class
        if variant in _loaded:
            raise
        _failed.add(variant)
        warnings.warn(f"moe_lm.fused: Triton kernel {variant[0]} cannot run on {variant[-1]} ({exc}); "
                      "computing it with PyTorch instead", RuntimeWarning, stacklevel=3)
        return None
    _loaded.add(variant)
    return out


def silu_mul_key(dtype: torch.dtype, scaled: bool, width: int, gate_stride: int, up_stride: int) -> tuple:
    """What Triton compiles a variant of the silu_mul kernel for: dtype, scale or not, and whether
    the width and row strides are multiples of 16 (it specialises integer arguments on that)."""
    return ("silu_mul", dtype, scaled, width % 16, gate_stride % 16, up_stride % 16)


def _silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    H = gate.shape[-1]
    g2, u2 = gate.reshape(-1, H), up.reshape(-1, H)  # views for contiguous batches, e.g. (E, N, H)
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    s = None if scale is None else scale.reshape(-1).contiguous()
    grid = (g2.shape[0], triton.cdiv(H, BLOCK))
    _silu_mul_kernel[grid](g2, u2, s if s is not None else g2, out, H, g2.stride(0), u2.stride(0),
                           HAS_SCALE=s is not None, BLOCK=BLOCK)
    return out.view(gate.shape)


def _gather_sum_triton(base: torch.Tensor | None, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    rows, index = rows.contiguous(), index.contiguous()
    N, k = index.shape
    C = rows.shape[1]
    out = torch.empty(N, C, dtype=rows.dtype, device=rows.device)
    b = rows if base is None else base.contiguous()
    _gather_sum_kernel[(N, triton.cdiv(C, BLOCK))](b, rows, index, out, C, K=k, HAS_BASE=base is not None,
                                                   BLOCK=BLOCK)
    return out


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, scale_ptr, out_ptr, n_cols, gate_stride, up_stride,
                         HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask).to(tl.float32)
        u = tl.load(up_ptr + row * up_stride + cols, mask=mask).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        if HAS_SCALE:
            h = h * tl.load(scale_ptr + row).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, h.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_sum_kernel(base_ptr, rows_ptr, index_ptr, out_ptr, n_cols,
                           K: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_BASE:
            acc += tl.load(base_ptr + n * n_cols + cols, mask=mask).to(tl.float32)
        for j in tl.static_range(K):
            r = tl.load(index_ptr + n * K + j).to(tl.int64)
            acc += tl.load(rows_ptr + r * n_cols + cols, mask=mask).to(tl.float32)
        tl.store(out_ptr + n * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
