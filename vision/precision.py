"""Which reduced precision a device runs the defect model in.

bf16 autocast halves the matmul cost wherever the hardware has bf16 arithmetic: every CUDA GPU
this project targets, and CPUs with AVX512-BF16 or AMX (oneDNN runs bf16 convolutions and
matmuls natively there). On such a 2-core CPU a `tiny` training step takes 460 ms instead of
890 ms and `s14` inference 46 ms instead of 113 ms (bench/RESULTS.md). CPUs without native bf16
would emulate it slowly, so they stay in fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from lineinspect.errors import LineInspectError

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device` (None = plain fp32)."""
    if precision not in PRECISIONS:
        raise LineInspectError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast for `dtype`, or nothing when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
