"""Reduced precision is chosen per device, and asked-for precisions are honoured."""

from __future__ import annotations

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.vision.precision import autocast, autocast_dtype, cpu_has_native_bf16


def test_precision_choice_per_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(gpu) is torch.bfloat16
    assert autocast_dtype(cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(gpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(LineInspectError, match="unknown precision 'fp16'"):
        autocast_dtype(cpu, "fp16")


def test_autocast_context_runs_matmuls_in_the_chosen_dtype() -> None:
    a = torch.randn(8, 8)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ a).dtype is torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (a @ a).dtype is torch.float32
