"""fp8 linear layers for the ViT: numerics where the runtime has an fp8 kernel, clear errors where not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.vision import fp8
from lineinspect.vision.encoder import VisionEncoder, preset

CPU = torch.device("cpu")
needs_cpu_fp8 = pytest.mark.skipif(
    fp8.fp8_unsupported_reason(CPU) is not None, reason=f"no fp8 on CPU: {fp8.fp8_unsupported_reason(CPU)}"
)


def tiny_encoder() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(preset("tiny", img_size=32)).eval()


@needs_cpu_fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_close_to_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    x = torch.randn(5, 7, 64, dtype=dtype)
    y = fp8.Fp8Linear(linear)(x)
    ref = linear(x)
    assert y.shape == ref.shape and y.dtype == dtype
    rel = (y.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.06  # e4m3 keeps 3 mantissa bits: a few per cent, never more


@needs_cpu_fp8
def test_convert_encoder_patch_tokens_close() -> None:
    encoder = tiny_encoder()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = encoder(images).patches
        n = fp8.convert_linears_to_fp8(encoder)
        out = encoder(images).patches
    assert n == 4 * encoder.config.depth  # qkv, proj, fc1, fc2 per block
    assert sum(isinstance(m, fp8.Fp8Linear) for m in encoder.modules()) == n
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.1


def test_convert_raises_clearly_without_scaled_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "_scaled_mm")
    with pytest.raises(LineInspectError, match="cannot run in fp8 here.*_scaled_mm"):
        fp8.convert_linears_to_fp8(tiny_encoder())


def test_convert_raises_clearly_when_the_kernel_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no float8 kernel for this device")

    fp8._probe.cache_clear()
    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    try:
        with pytest.raises(LineInspectError, match="no float8 kernel for this device"):
            fp8.convert_linears_to_fp8(tiny_encoder())
    finally:
        fp8._probe.cache_clear()  # the real kernel's answer must not stay cached as a failure


def test_convert_needs_a_vision_transformer() -> None:
    with pytest.raises(LineInspectError, match="no timm VisionTransformer"):
        fp8.convert_linears_to_fp8(nn.Sequential(nn.Linear(16, 16)))
