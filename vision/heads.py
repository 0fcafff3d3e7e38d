"""Fast defect heads on the encoder's patch tokens.

The ViT sees the image in 14 px (or 8 px) patches, too coarse for thin scratches. A small
convolutional pixel branch sees the image at 1/2, 1/4 and 1/8 resolution; the head fuses the
ViT's multi-layer patch tokens with it in a U-Net-like decoder (multi-scale features), and
predicts a per-pixel defect logit map, an image-level defect logit and class logits.

With `self_similarity` on, the head also measures how unlike the rest of its own image each
1/8-resolution location is (`vision.self_similarity`) and feeds that novelty to the decoder and
the image logit: a strong, texture-independent cue that the head can learn to trust in far
fewer steps than it needs to learn "defect" from pixels alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.vision.self_similarity import self_similarity_map


@dataclass(frozen=True)
class HeadConfig:
    stem_channels: tuple[int, int, int] = (32, 64, 96)  # pixel branch at 1/2, 1/4, 1/8
    decoder_channels: int = 64
    num_classes: int = 0  # defect classes; 0 when the line has no class labels
    self_similarity: bool = True  # novelty of each location against the rest of its image

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        data = dict(data)
        data["stem_channels"] = tuple(data["stem_channels"])
        data.setdefault("self_similarity", False)  # model directories written before it existed
        return cls(**data)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class PixelStem(nn.Module):
    """Three strided conv stages: (B,3,S,S) -> [(B,c1,S/2,S/2), (B,c2,S/4,S/4), (B,c3,S/8,S/8)]."""

    def __init__(self, channels: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.s2 = nn.Sequential(conv_block(3, c1, 2), conv_block(c1, c1))
        self.s4 = nn.Sequential(conv_block(c1, c2, 2), conv_block(c2, c2))
        self.s8 = nn.Sequential(conv_block(c2, c3, 2), conv_block(c3, c3))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        f2 = self.s2(images)
        f4 = self.s4(f2)
        f8 = self.s8(f4)
        return [f2, f4, f8]


class HeadOutput(NamedTuple):
    mask_logits: torch.Tensor  # (B, 1, S, S) per-pixel defect logits at model input resolution
    image_logit: torch.Tensor  # (B,) image-level defect logit
    class_logits: torch.Tensor | None  # (B, K) or None without classes
    novelty: torch.Tensor | None  # (B, 1, S/8, S/8) self-similarity novelty (1 = typical), if enabled


class DefectHead(nn.Module):
    def __init__(self, config: HeadConfig, vit_dim: int, n_vit_layers: int) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.stem_channels
        d = config.decoder_channels
        self.stem = PixelStem(config.stem_channels)
        self.vit_proj = nn.Sequential(
            nn.Conv2d(vit_dim * n_vit_layers, d, 1, bias=False), nn.BatchNorm2d(d), nn.GELU()
        )
        extra = 1 if config.self_similarity else 0
        self.fuse8 = nn.Sequential(conv_block(d + c3 + extra, d), conv_block(d, d))
        self.fuse4 = nn.Sequential(conv_block(d + c2, d), conv_block(d, d))
        # The half-resolution stage is the costliest per channel: squeeze before fusing there.
        self.squeeze2 = nn.Conv2d(d, c1, 1)
        self.fuse2 = conv_block(2 * c1, c1)
        self.mask_out = nn.Conv2d(c1, 1, 1)
        pooled = vit_dim + d + c3
        self.image_out = nn.Sequential(nn.Linear(pooled + 2 + extra, d), nn.GELU(), nn.Linear(d, 1))
        self.class_out = (
            nn.Sequential(nn.Linear(pooled, d), nn.GELU(), nn.Dropout(0.1), nn.Linear(d, config.num_classes))
            if config.num_classes
            else None
        )

    def forward(self, images: torch.Tensor, vit_features: list[torch.Tensor], cls: torch.Tensor) -> HeadOutput:
        """images (B,3,S,S); vit_features: per layer (B,C,h,w); cls (B,C)."""
        f2, f4, f8 = self.stem(images)
        v = self.vit_proj(torch.cat(vit_features, dim=1))  # (B, d, h, w)
        at8 = [F.interpolate(v, size=f8.shape[-2:], mode="bilinear"), f8]
        novelty = self_similarity_map(f8) if self.config.self_similarity else None
        if novelty is not None:
            at8.append(novelty.log().to(f8.dtype))
        x = self.fuse8(torch.cat(at8, 1))
        x = self.fuse4(torch.cat([F.interpolate(x, size=f4.shape[-2:], mode="bilinear"), f4], 1))
        x = F.interpolate(self.squeeze2(x), size=f2.shape[-2:], mode="bilinear")
        x = self.fuse2(torch.cat([x, f2], 1))
        mask_logits = F.interpolate(self.mask_out(x), size=images.shape[-2:], mode="bilinear")
        # Image-level evidence: pooled semantics plus the peak and mean of the map itself.
        pooled = torch.cat([cls, v.mean((2, 3)), f8.mean((2, 3))], 1)  # (B, C + d + c3)
        peak = F.max_pool2d(mask_logits, 8).flatten(1)
        stats = [peak.max(1).values, mask_logits.flatten(1).mean(1)]
        if novelty is not None:
            stats.append(novelty.flatten(1).amax(1).log().to(peak.dtype))
        image_logit = self.image_out(torch.cat([pooled, torch.stack(stats, 1)], 1)).squeeze(1)
        class_logits = self.class_out(pooled) if self.class_out is not None else None
        return HeadOutput(mask_logits, image_logit, class_logits, novelty)
