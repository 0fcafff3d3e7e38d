"""Perceiver-style resampler: a fixed set of learned queries reads the vision tokens.

(B, N, D_img) patch tokens of any N -> (B, L, D_model) latents for the decoder's cross-attention.
A projector (LayerNorm + Linear) first maps the vision width to the decoder width. In each layer
the latents attend to the vision tokens and to themselves (keys = [vision; latents], as in
Flamingo), then pass through a small MLP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.errors import LineInspectError


@dataclass(frozen=True)
class ResamplerConfig:
    preset: str
    vision_dim: int  # the encoder's width (EncoderOutput.patches[-1])
    dim: int  # the decoder's image_dim (its width by default)
    n_latents: int = 64  # image tokens the decoder sees per image
    depth: int = 2
    n_heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("vision_dim", "dim", "n_latents", "depth", "n_heads"):
            if getattr(self, name) <= 0:
                raise LineInspectError(f"resampler config {self.preset!r}: {name} must be positive")
        if self.dim % self.n_heads:
            raise LineInspectError(
                f"resampler config {self.preset!r}: dim {self.dim} is not a multiple of n_heads {self.n_heads}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ResamplerConfig:
        return cls(**data)


PRESETS: dict[str, ResamplerConfig] = {
    "tiny": ResamplerConfig("tiny", vision_dim=192, dim=64, n_latents=16, depth=2, n_heads=4),
    "l14": ResamplerConfig("l14", vision_dim=1024, dim=1024, n_latents=64, depth=2, n_heads=16),
}


def preset(name: str, **overrides) -> ResamplerConfig:
    if name not in PRESETS:
        raise LineInspectError(f"unknown resampler preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, latents: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor | None) -> torch.Tensor:
        """latents: (B, L, D); media: (B, N, D); media_mask: (B, N) bool, True = valid."""
        B, L, D = latents.shape
        lat = self.norm_latents(latents)
        keys_in = torch.cat((self.norm_media(media), lat), dim=1)  # (B, N + L, D)
        q = self.q(lat).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k, v = self.kv(keys_in).view(B, -1, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if media_mask is not None:  # latents are always valid keys, so no row is fully masked
            mask = torch.cat((media_mask, media_mask.new_ones(B, L)), dim=1)[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        latents = latents + self.out(y.transpose(1, 2).reshape(B, L, D))
        return latents + self.mlp(latents)


class Resampler(nn.Module):
    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Sequential(nn.LayerNorm(config.vision_dim), nn.Linear(config.vision_dim, config.dim))
        self.latents = nn.Parameter(torch.randn(config.n_latents, config.dim) * 0.02)
        self.layers = nn.ModuleList(
            ResamplerLayer(config.dim, config.n_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, vision_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """vision_tokens: (B, N, D_img), e.g. EncoderOutput.patches; mask: (B, N) bool or None.
        Returns (B, L, D) image tokens for the decoder."""
        if vision_tokens.dim() != 3 or vision_tokens.shape[-1] != self.config.vision_dim:
            raise LineInspectError(
                f"resampler: expected vision tokens (B, N, {self.config.vision_dim}), got {tuple(vision_tokens.shape)}"
            )
        media = self.proj(vision_tokens)  # (B, N, D)
        latents = self.latents.expand(media.shape[0], -1, -1)  # (B, L, D)
        for layer in self.layers:
            latents = layer(latents, media, mask)
        return self.norm(latents)
