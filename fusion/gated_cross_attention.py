"""Dynamic-gated cross-attention: text tokens read image tokens, scaled by a per-token gate.

The decoder (moe_lm/decoder.py) imports this module and inserts it in every k-th block; fusion
imports nothing from moe_lm, so the dependency runs one way. The layer is self-contained and
stateless: image keys/values and masks come in as arguments.

Gate: g = tanh(alpha) * sigmoid(W h + b), one value per head (applied before the output
projection) or per channel (applied after it), where h is the token's normed hidden state.
alpha starts at 0, so g == 0 exactly and the decoder starts as a pure language model; alpha gets
a gradient from the first step, and once it moves the attention and W learn as well.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.errors import LineInspectError


class ContextKV(NamedTuple):
    keys: torch.Tensor  # (B, H, L, hd)
    values: torch.Tensor  # (B, H, L, hd)


class GatedCrossAttention(nn.Module):
    """x (B, T, C) -> residual update (B, T, C) from image tokens (B, L, D_ctx)."""

    def __init__(self, dim: int, context_dim: int, n_heads: int, gate: str = "head", eps: float = 1e-5) -> None:
        super().__init__()
        if dim % n_heads:
            raise LineInspectError(f"gated cross-attention: dim {dim} is not a multiple of n_heads {n_heads}")
        if gate not in ("head", "channel"):
            raise LineInspectError(f"gated cross-attention: gate {gate!r} is not 'head' or 'channel'")
        self.n_heads, self.head_dim, self.gate_mode = n_heads, dim // n_heads, gate
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        n_gate = n_heads if gate == "head" else dim
        self.gate_proj = nn.Linear(dim, n_gate)  # W h + b: the dynamic, per-token part
        self.gate_scale = nn.Parameter(torch.zeros(n_gate))  # alpha: tanh(0) = 0 closes the gate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q, self.kv, self.out, self.gate_proj):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.gate_proj.bias)
        nn.init.zeros_(self.gate_scale)
        self.norm.reset_parameters()

    def project_context(self, context: torch.Tensor) -> ContextKV:
        """context: (B, L, D_ctx) image tokens -> keys, values (B, H, L, hd); reusable across steps."""
        B, L, _ = context.shape
        k, v = self.kv(context).view(B, L, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return ContextKV(k, v)

    def forward(
        self, x: torch.Tensor, context: ContextKV, context_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, C); context_mask: (B, L) bool, True = attend, or None for all valid.

        Returns the update to add to x and the mean gate openness |g| over the rows that have at
        least one valid image token (a detached scalar; 0 when no row has one). Rows with no valid
        image token get an update of exactly zero.
        """
        B, T, C = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        has_image = None
        mask = None
        if context_mask is not None:
            has_image = context_mask.any(dim=-1)  # (B,)
            # A row with no image would have an all-masked softmax (NaN): let it see everything,
            # then zero its update below.
            mask = (context_mask | ~has_image[:, None])[:, None, None, :]  # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, context.keys, context.values, attn_mask=mask)  # (B, H, T, hd)
        gate = torch.tanh(self.gate_scale) * torch.sigmoid(self.gate_proj(h))  # (B, T, G)
        if self.gate_mode == "head":
            y = y * gate.transpose(1, 2).unsqueeze(-1).to(y.dtype)
            out = self.out(y.transpose(1, 2).reshape(B, T, C))
        else:
            out = self.out(y.transpose(1, 2).reshape(B, T, C)) * gate.to(y.dtype)
        openness = gate.detach().abs().mean(dim=(1, 2))  # (B,)
        if has_image is not None:
            out = out * has_image[:, None, None].to(out.dtype)
            openness = openness[has_image]
        return out, openness.mean() if openness.numel() else openness.new_zeros(())
