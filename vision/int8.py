"""Symmetric int8 linear layers for CPU inference: ``quantize_linears(model)``.

Each selected ``nn.Linear`` becomes an ``Int8Linear``. Its weight is quantised once, per output
channel and symmetrically: scale = max |w_row| / 127, zero point 0, values in [-127, 127]. The
int8 values and float32 scales are plain tensors, so a quantised model directory stays
safetensors + JSON (``vision.model_io`` records the layers in config.json and rebuilds them).

On CPU the product runs in torch's dynamically quantised linear kernel (``quantized::linear_dynamic``:
each call quantises the activation per tensor, multiplies int8 x int8 into int32 and rescales),
packed once per layer for the first engine that works here: fbgemm (x86), oneDNN or QNNPACK (Arm).
torch marks its quantized tensor API deprecated but still ships these kernels (2.14); where they
are missing, and on GPUs, the weight is dequantised and multiplied in float instead: the same
weights, no speed-up.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lineinspect.errors import LineInspectError

SCHEME = "int8-symmetric-per-channel"
QMAX = 127
ENGINES = ("fbgemm", "onednn", "qnnpack")  # preference order; fbgemm was fastest on the 2-core EPYC
MIN_SCALE = 1e-12  # an all-zero row keeps a usable scale


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 values in [-127, 127], float32 scale per output row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / QMAX).clamp_min(MIN_SCALE)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _pack(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, engine: str) -> object:
    """Pack int8 weights for ``quantized::linear_dynamic`` on `engine` (the engine is process-global
    in torch; it is switched only for the packing, which fixes the kernel the product uses)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        qweight = torch._make_per_channel_quantized_tensor(
            weight.cpu(), scale.cpu().double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float().cpu())
    finally:
        torch.backends.quantized.engine = previous


@functools.cache
def cpu_engine() -> str | None:
    """The first quantized engine whose int8 dynamic linear runs and is right here (probed once), or None."""
    g = torch.Generator().manual_seed(0)
    weight, scale = quantize_weight(torch.randn(16, 32, generator=g))
    x = torch.randn(8, 32, generator=g)
    ref = x @ (weight.float() * scale[:, None]).T
    supported = getattr(torch.backends.quantized, "supported_engines", [])
    for engine in (e for e in ENGINES if e in supported):
        try:
            with warnings.catch_warnings():  # torch warns once that quantized tensors are deprecated
                warnings.simplefilter("ignore")
                y = torch.ops.quantized.linear_dynamic(x, _pack(weight, scale, None, engine), True)
        except (AttributeError, RuntimeError, NotImplementedError):
            continue
        if (y - ref).abs().max() <= 0.03 * ref.abs().max():  # 7-bit activations: about 1% here
            return engine
    return None


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with int8 weights q; same shapes and output dtype as the nn.Linear it replaces."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: object | None = None  # CPU kernel's packed weights, built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight_int8, layer.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        engine = cpu_engine() if x.device.type == "cpu" else None
        if engine is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if self._packed is None:
            self._packed = _pack(self.weight_int8, self.weight_scale, self.bias, engine)
        # The kernel takes float32 (bf16 under autocast is converted) and, as torch's own dynamic
        # quantised Linear does, quantises activations to 7 bits so that no x86 kernel saturates.
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
        out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return y.view(*x.shape[:-1], self.out_features).to(out_dtype)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # new weights: pack again on next use

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def encoder_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers inside the transformer blocks (qkv, proj, fc1, fc2): nearly all
    of a ViT's multiply-adds. The head's linears act on one pooled vector per image and are not worth it."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            base = f"{prefix}.blocks" if prefix else "blocks"
            names += [f"{base}.{n}" for n, m in module.blocks.named_modules() if isinstance(m, nn.Linear)]
    return names


def _replace(model: nn.Module, names: list[str], build: Callable[[nn.Linear], nn.Module]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise LineInspectError(f"int8: {name!r} is not a linear layer of this model")
        setattr(parent, child, build(linear))


def quantize_linears(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace, in place, the named nn.Linear layers (default: `encoder_linears`) with Int8Linear;
    returns the names replaced."""
    names = encoder_linears(model) if names is None else list(names)
    if not names:
        raise LineInspectError("int8: the model has no linear layers to quantise")
    _replace(model, names, Int8Linear.from_linear)
    return names


def int8_layout(model: nn.Module, names: list[str]) -> None:
    """Give the named nn.Linear layers the Int8Linear shape (empty), so that a quantised state dict loads."""
    _replace(model, names, lambda lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None))


def quantized_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
