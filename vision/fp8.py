"""fp8 (e4m3) linear layers for ViT inference: ``convert_linears_to_fp8(model)``.

Each ``nn.Linear`` inside a timm VisionTransformer's blocks (qkv, proj, fc1, fc2) becomes an
``Fp8Linear``: the weight is quantised once with a static per-tensor scale, the activation on
every call with a dynamic per-tensor scale (its absolute maximum), and ``torch._scaled_mm``
multiplies the two in fp8 with higher-precision accumulation. Inference only: the fp8 weight is
a buffer, not a trainable parameter.

Which devices have an fp8 kernel depends on the torch build (CUDA compute capability 8.9 or
newer; CPU in recent releases), so support is probed once per device by running a tiny product,
the same way ``moe_lm.experts`` probes ``torch._grouped_mm``.
"""

from __future__ import annotations

import functools

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lineinspect.errors import LineInspectError

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_SCALE = 1e-12  # keeps an all-zero tensor from dividing by zero


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaling: x -> (x / scale as float8_e4m3fn, scale as a float32 scalar); max |x| maps to 448.

    The scale is computed and applied in x's own dtype (no float32 copy of a bf16 activation),
    and the very same value dequantises, so scaling adds no error beyond fp8's own rounding.
    """
    scale = (torch.linalg.vector_norm(x.detach(), float("inf")) / FP8_MAX).clamp_min(MIN_SCALE)  # max |x|, one pass
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float()


class Fp8Linear(nn.Module):
    """y = x @ W.T + b computed in fp8; same shapes and output dtype rules as the nn.Linear it replaces.

    The output dtype is the autocast dtype when autocast is on, otherwise the input's dtype.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize(linear.weight)
        self.register_buffer("weight_fp8", weight.contiguous())  # (out, in), row-major
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x2d, x_scale = quantize(x.reshape(-1, self.in_features))
        # _scaled_mm fuses a bias only for 16-bit outputs, and only one of the output's dtype.
        fused = self.bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(
            x2d, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
            bias=self.bias.to(out_dtype) if fused else None, out_dtype=out_dtype,
        )
        if self.bias is not None and not fused:
            y = y + self.bias.to(out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """None when fp8 linears run on `device`, else why not (one sentence)."""
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8_e4m3fn or torch._scaled_mm"
    return _probe(device.type, device.index)


@functools.cache
def _probe(device_type: str, index: int | None) -> str | None:
    """Run one small fp8 product on the device; the answer is a fact about the process, cached."""
    device = torch.device(device_type, index)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 32, generator=g).to(device, torch.bfloat16)
        linear = nn.Linear(32, 16).to(device, torch.bfloat16)
        y = Fp8Linear(linear)(x)
        ref = linear(x)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch._scaled_mm failed on {device} ({str(exc).splitlines()[0]})"
    if not torch.allclose(y.float(), ref.float(), rtol=0.1, atol=0.1):
        return f"torch._scaled_mm gave wrong results on {device}"
    return None


def convert_linears_to_fp8(model: nn.Module) -> int:
    """Replace, in place, every nn.Linear in the blocks of each VisionTransformer inside `model`
    with an Fp8Linear; returns how many were replaced.

    Raises LineInspectError when the model's device has no fp8 kernel, when `model` holds no
    VisionTransformer, or when a layer's widths are not multiples of 16 (a _scaled_mm requirement).
    """
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if not vits:
        raise LineInspectError("fp8: the model holds no timm VisionTransformer to convert")
    device = next(model.parameters()).device
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise LineInspectError(f"fp8: linear layers cannot run in fp8 here: {reason}; keep bf16")
    targets = [(parent, name, child) for vit in vits for parent in vit.blocks.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for _, name, linear in targets:
        if linear.in_features % 16 or linear.out_features % 16:
            raise LineInspectError(
                f"fp8: layer {name} is {linear.in_features} -> {linear.out_features}; fp8 needs multiples of 16"
            )
    for parent, name, linear in targets:
        setattr(parent, name, Fp8Linear(linear))
    return len(targets)
