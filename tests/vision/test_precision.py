"""Reduced precision is chosen per device, and asked-for precisions are honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration, Inspector, cpu_bf16_copy
from lineinspect.vision.int8 import quantize_linears
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


def test_bf16_cpu_inspector_runs_a_bf16_weight_copy_with_the_same_output_and_hooks() -> None:
    torch.manual_seed(0)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(num_classes=3),
                                          memory_bank_size=32)).eval()
    inspector = Inspector(model, Calibration(class_names=("a", "b", "c")), "cpu", precision="bf16")
    runner = inspector._cpu_runner
    assert runner is not None and runner is not model
    linear_dtypes = {m.weight.dtype for m in runner.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert linear_dtypes == {torch.bfloat16}
    assert next(model.parameters()).dtype is torch.float32  # the caller's model is left as it was
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(out))
    batch = torch.rand(2, 3, 64, 64)
    try:
        out = inspector.run_model(batch)
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0] is out
    model.encoder.use_fused_attention(False)  # as the Inspector set it on its copy
    with torch.inference_mode(), autocast(torch.device("cpu"), torch.bfloat16):
        expected = model(batch)
    # autocast casts the fp32 weights to bf16 on every call; the copy holds them in bf16 already
    torch.testing.assert_close(out.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(out.class_logits, expected.class_logits)
    assert Inspector(model, Calibration(), "cpu", precision="fp32")._cpu_runner is None


def test_int8_models_keep_their_own_cpu_path() -> None:
    torch.manual_seed(0)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig())).eval()
    quantize_linears(model)
    assert cpu_bf16_copy(model) is None


def test_inspector_reports_what_it_computes_in() -> None:
    torch.manual_seed(0)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig())).eval()
    assert Inspector(model, Calibration(), "cpu", precision="fp32").info()["precision"] == "fp32"
    assert Inspector(model, Calibration(), "cpu", precision="bf16").info()["precision"] == "bf16"
    quantize_linears(model)
    assert Inspector(model, Calibration(), "cpu", precision="fp32").info()["precision"] == "int8 linears, fp32"
