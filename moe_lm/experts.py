"""SwiGLU experts: one dense expert (shared experts use it) and E routed experts computed grouped.

Routed experts keep their weights stacked, (E, C, 2H) with gate and up side by side, and (E, H, C),
so that all experts run in one batched computation over token rows sorted by expert. The caller
passes the groups as ``offs``, the (E,) int32 end row of each expert's group, computed on the device:

* ``grouped_mm``: ``torch._grouped_mm(x (M, C), w (E, C, N), offs)`` multiplies each contiguous
  row group by its expert's matrix in one kernel, with no padding and no host sync: gate and up
  (one grouped GEMM, or two), the SwiGLU activation times each row's router weight (``moe_lm.fused``),
  then the down GEMM. With ``fused_gemm`` on, at inference on CUDA, one Triton kernel does the
  gate-up stage instead, reading the token rows through the caller's index in place
  (``moe_lm.fused_gemm``). Nothing on this path reads a device value on the host, so it runs under
  a CUDA graph. It exists in recent torch, needs every row stride to be a multiple of 16 bytes, and
  has kernels for a set of devices and dtypes that grows with each release (bf16 on Hopper first;
  on torch 2.11 an H200 also ran fp16 and fp32, and CPU ran all three); ``grouped_mm_supported``
  checks the widths and probes the runtime once per device and dtype.
* ``padded_bmm`` (the fallback, any device and dtype): scatter each group into a zero-padded
  (E, P, C) buffer, P = the largest group, and use ``torch.bmm``. We chose it over a block-diagonal
  or per-expert launch because bmm is one kernel with autograd on every backend, and the padding
  it wastes is bounded: with balanced routing P is close to the mean group. Zero rows contribute
  nothing to outputs or weight gradients. Its cost is one host sync (P) and (E * P - M) wasted
  rows when routing is skewed.

Measured once on an H200 (torch 2.11, bf16, l14 sizes, 8192 tokens, MoE block forward+backward):
balanced routing grouped_mm 3.6 ms, padded_bmm 4.2 ms, per-expert loop 17.2 ms; with routing
skewed so one expert takes every token: 3.5, 12.8 and 5.2 ms.

The plain per-expert Python loop exists only as the test oracle (tests/moe_lm).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.fused import silu_mul, silu_mul_key, use_triton
from lineinspect.moe_lm.fused_gemm import gate_up_silu


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x: (..., C) -> (..., C)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.fused_kernels = True  # Triton silu * up at inference on CUDA (moe_lm.fused); off for A/B timing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products on the two halves of the weight rather than one product and a split: the
        # halves of one output are strided views, on which the element-wise kernels run unvectorised
        # (on an H200 that made silu and the product 3-4x slower than their memory traffic).
        h = self.down.in_features
        gate = F.linear(x, self.gate_up.weight[:h])
        up = F.linear(x, self.gate_up.weight[h:])
        return self.down(silu_mul(gate, up, fused=self.fused_kernels))


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x really runs in (autocast does not cover torch._grouped_mm)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether torch._grouped_mm runs here for matrices whose inner widths are `dims`."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if any((d * dtype.itemsize) % 16 for d in dims):  # every row stride a multiple of 16 bytes
        return False
    return _grouped_mm_runs(device.type, device.index, dtype)


@functools.cache
def _grouped_mm_runs(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    """Probe once per device and dtype: one tiny grouped product, forward and backward.

    Which devices, dtypes and architectures have a kernel changes between torch releases (bf16
    on Hopper first; CPU and other dtypes later), so we ask the runtime instead of keeping a
    table. The answer is a fact about the process, cached here, not per-request state.
    """
    device = torch.device(device_type, index)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            a = torch.randn(5, 16, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            y = torch._grouped_mm(a, b, offs=torch.tensor([2, 5], device=device, dtype=torch.int32))
            y.backward(torch.ones_like(y))
            ref = torch.cat((a[:2] @ b[0], a[2:] @ b[1]))
            return bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # _grouped_mm's backward rejects stride-0 (expanded) gradients such as those of a plain sum().
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; forward runs them grouped over sorted token groups."""

    def __init__(self, n_experts: int, width: int, hidden: int, dropout: float = 0.0, impl: str = "auto") -> None:
        super().__init__()
        self.n_experts, self.width, self.hidden = n_experts, width, hidden
        self.dropout, self.impl = dropout, impl
        # grouped_mm: gate and up as one product when the Triton activation reads its two halves (on an
        # H100 at 4,096 tokens 0.443 against 0.458 ms), as two otherwise (see SwiGLU.forward); True or
        # False forces one way (A/B timing)
        self.split_gate_up: bool | None = None
        self.fused_kernels = True  # Triton silu * up * scale at inference on CUDA (moe_lm.fused); off for A/B
        # The gather, gate-up GEMM and activation as one Triton kernel at inference on CUDA (moe_lm.fused_gemm);
        # on an H100 the l14 layer took 0.432 against 0.445 ms at 4,096 tokens, 0.144 against 0.151 at 64
        # (bench/gpu_moe_gemm.sh). False for A/B; the tile config is chosen by rows unless a key is set.
        self.fused_gemm = True
        self.fused_gemm_config: str | None = None
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, width, 2 * hidden))  # x @ w -> [gate, up]
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, width))
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    def resolve_impl(self, x: torch.Tensor) -> str:
        """The computation forward will use for input x: "grouped_mm" or "padded_bmm"."""
        ok = grouped_mm_supported(x.device, _mm_dtype(x), (self.width, 2 * self.hidden, self.hidden))
        if self.impl == "grouped_mm" and not ok:
            raise LineInspectError(
                f"experts: expert_impl 'grouped_mm' is not supported for {_mm_dtype(x)} on {x.device} with "
                f"width {self.width}, hidden {self.hidden}; use expert_impl 'auto' or 'padded_bmm'"
            )
        return "grouped_mm" if self.impl == "grouped_mm" or (self.impl == "auto" and ok) else "padded_bmm"

    def forward(self, x: torch.Tensor, offs: torch.Tensor, scale: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """x: (M, C) rows sorted by expert, or with index (M,) int the token rows (T, C) whose rows
        x[index] are sorted by expert (the fused gate-up kernel reads them in place); offs: (E,) int32,
        the end row of each expert's group (offs[-1] == M; equal neighbours = an empty group); scale:
        (M,) weights of the rows' outputs (the router's), or None. Returns (M, C)."""
        if (x.shape[0] if index is None else index.shape[0]) == 0:
            return x.new_zeros(0, self.width)
        if self.resolve_impl(x) == "grouped_mm":
            return self._grouped_mm(x, offs, scale, index)
        if index is not None:
            x = x.index_select(0, index)
        y = self._padded_bmm(x, offs)
        return y if scale is None else y * scale[:, None].to(y.dtype)

    def all_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: x (N, C) -> (E, N, C), as batched products (inference, few rows)."""
        dtype, H = _mm_dtype(x), self.hidden
        w = self.w_gate_up.to(dtype)
        xs = x.to(dtype).expand(self.n_experts, *x.shape)
        h = silu_mul(torch.bmm(xs, w[:, :, :H]), torch.bmm(xs, w[:, :, H:]), fused=self.fused_kernels)  # (E, N, H)
        return torch.bmm(h, self.w_down.to(dtype))

    def _activate(self, gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = silu_mul(gate, up, scale, self.fused_kernels)
        return F.dropout(h, p=self.dropout, training=self.training)

    def _grouped_mm(self, x: torch.Tensor, offs: torch.Tensor, scale: torch.Tensor | None,
                    index: torch.Tensor | None) -> torch.Tensor:
        dtype = _mm_dtype(x)
        x, w = x.to(dtype), self.w_gate_up.to(dtype)
        h = None
        if index is not None and self._use_fused_gemm(x):
            h = gate_up_silu(x, index, offs, w, scale, self.fused_gemm_config)  # None where Triton cannot run
        if h is None:
            h = self._gate_up(x if index is None else x.index_select(0, index), w, offs, scale)
        return _contiguous_grad(torch._grouped_mm(h, self.w_down.to(dtype), offs=offs))  # (M, C)

    def _use_fused_gemm(self, x: torch.Tensor) -> bool:
        """Whether to offer the fused gate-up kernel: switched on, no gradient recorded (it has no backward:
        training steps skip it before its key is even built), bf16 or fp16 (on fp32 its products would
        round to TF32, the eager path's do not), and no dropout to apply to its output."""
        return (self.fused_gemm and not torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float16)
                and not (self.training and self.dropout))

    def _gate_up(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, scale: torch.Tensor | None
                 ) -> torch.Tensor:
        """The eager gate-up stage: x (M, C) rows in expert order -> the activation h (M, H)."""
        H = self.hidden
        split = self.split_gate_up
        if split is None:  # one product if the activation will run in Triton on its halves
            halves = silu_mul_key(x.dtype, scale is not None, H, 2 * H, 2 * H)  # of one (M, 2H) product
            split = not (self.fused_kernels and use_triton(halves, x, numel=x.shape[0] * H))
        if split:
            gate = _contiguous_grad(torch._grouped_mm(x, w[:, :, :H], offs=offs))  # (M, H)
            up = _contiguous_grad(torch._grouped_mm(x, w[:, :, H:], offs=offs))
        else:
            gate, up = _contiguous_grad(torch._grouped_mm(x, w, offs=offs)).chunk(2, dim=-1)  # (M, H) each
        return self._activate(gate, up, scale)

    def _padded_bmm(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        E, M = self.n_experts, x.shape[0]
        ends = offs.long()
        group_sizes = ends.diff(prepend=ends.new_zeros(1))  # (E,)
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), group_sizes, output_size=M)  # (M,)
        slot = torch.arange(M, device=x.device) - (ends - group_sizes)[expert]  # (M,) row inside its group
        P = int(group_sizes.max())
        padded = x.new_zeros(E, P, self.width).index_put((expert, slot), x)  # (E, P, C)
        h = self._activate(*torch.bmm(padded, self.w_gate_up.to(padded.dtype)).chunk(2, dim=-1))  # (E, P, H)
        y = torch.bmm(h, self.w_down.to(h.dtype))  # (E, P, C)
        return y[expert, slot]  # (M, C)
