"""Bilinear resizing as matrix products (vision.upsampling) against F.interpolate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lineinspect.vision.upsampling import resize_by_matrices, upsample_bilinear

SHAPES = ((16, 16, 28, 28), (28, 28, 56, 56), (112, 112, 224, 224), (7, 5, 28, 30), (30, 40, 15, 20))


@pytest.mark.parametrize(("h_in", "w_in", "h_out", "w_out"), SHAPES)
def test_matrices_resize_as_interpolate_does(h_in: int, w_in: int, h_out: int, w_out: int) -> None:
    """Enlarging, shrinking and uneven sizes: the same values, and the same gradient (GPU training
    runs through the matrices)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, h_in, w_in, requires_grad=True)
    ref = F.interpolate(x, size=(h_out, w_out), mode="bilinear", align_corners=False)
    out = resize_by_matrices(x, (h_out, w_out))
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    weight = torch.randn_like(ref)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    (grad_out,) = torch.autograd.grad((out * weight).sum(), x)
    assert torch.allclose(grad_out, grad_ref, atol=1e-4)


def test_cpu_keeps_the_library_kernel() -> None:
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(upsample_bilinear(x, (18, 18)), F.interpolate(x, size=(18, 18), mode="bilinear"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_resizes_bf16_maps_as_interpolate_does() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 64, 28, 28, device="cuda", dtype=torch.bfloat16)
    ref = F.interpolate(x.float(), size=(56, 56), mode="bilinear", align_corners=False)
    out = upsample_bilinear(x, (56, 56)).float()
    assert torch.allclose(out, ref, atol=0.03, rtol=0.02)  # bf16 rounding of the weights and the result
