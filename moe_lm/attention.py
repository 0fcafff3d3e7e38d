"""Rotary positions and causal self-attention with grouped-query heads and an explicit KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.kv_cache import KVCache


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (B, T) long -> cos, sin: (B, 1, T, head_dim // 2) float32.

    Positions are per row, so a left-padded row gets the same angles as the unpadded sequence.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); rotates the two halves of each head as complex pairs, in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def causal_padding_mask(key_mask: torch.Tensor, start: int, n_new: int) -> torch.Tensor:
    """Causal mask over padded keys. key_mask: (B, S) bool, True for real tokens, S = start + n_new.

    Returns (B, 1, n_new, S) bool, True = may attend. Query t sits at slot start + t and sees keys
    j <= start + t that are real; it always sees itself, so a padding query never has an all-masked
    row (its output is junk that nothing reads, but it stays finite).
    """
    S = key_mask.shape[1]
    q_slot = torch.arange(n_new, device=key_mask.device)[:, None] + start  # (T, 1)
    k_slot = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    allowed = causal & key_mask[:, None, :]  # (B, T, S)
    return (allowed | (k_slot == q_slot))[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.width, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (B, T, C); mask: (B, 1, T, S) bool or None for plain causal attention without a cache.

        With a cache, this block's new keys and values are written at slots [cache.length, +T) and
        attention reads slots [0, cache.length + T); the decoder advances cache.length afterwards.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, Hkv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
