"""Fast defect heads on the encoder's patch tokens.

The ViT sees the image in 14 px (or 8 px) patches, too coarse for thin scratches. A small
convolutional pixel branch sees the image at 1/2, 1/4 and 1/8 resolution; the head fuses the
ViT's multi-layer patch tokens with it in a U-Net-like decoder (multi-scale features), and
predicts a per-pixel defect logit map, an image-level defect logit and class logits.

With `self_similarity` on, the head also measures how unlike the rest of its own image each
1/8-resolution location is (`vision.self_similarity`) and feeds that novelty to the decoder and
the image logit: a strong, texture-independent cue that the head can learn to trust in far
fewer steps than it needs to learn "defect" from pixels alone. With `bandpass` on, it also gets
the image's Laplacian-pyramid bands and their novelty (`vision.bandpass`): soft defects tens of
pixels across, like dents, that a few minutes of training do not teach the pixel branch to see.
With `ridges` on, the pixel branch also reads oriented thin-line filter responses
(`vision.ridges`) and the decoder their peak per cell: scratches a pixel wide. The class head
names a defect from a crop around the region the map marks (`vision.crop_namer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.vision.bandpass import BANDPASS_CHANNELS, BandPass
from lineinspect.vision.chroma import CHROMA_CHANNELS, chroma_deviation
from lineinspect.vision.crop_namer import CropNamer, crop_features
from lineinspect.vision.preprocess import MEAN, STD
from lineinspect.vision.ridges import RIDGE_CHANNELS, Ridges, ridge_peaks
from lineinspect.vision.self_similarity import self_similarity_map
from lineinspect.vision.upsampling import upsample_bilinear

CLASS_POOLINGS = ("crop", "mask", "mean")
# At inference the crop namer names the defect from crops around the map's focus region at these shares
# of its peak and averages the probabilities: the tighter region often marks one segment of a faint
# scratch, the looser one more of it but more background too. Map crops named right, against 0.5 alone:
# s14 (20 CPU min, 175 defects a line) 0.931 -> 0.943 and 0.903 -> 0.920 on two held-out lines, tiny
# (3 min) 0.829 -> 0.840; with 0.35 instead of 0.4 tiny fell to 0.817 (bench/namer_confusion.py).
NAMING_SHARES = (0.5, 0.4)
CHROMA_MODES = ("off", "image", "pixel")


@dataclass(frozen=True)
class HeadConfig:
    stem_channels: tuple[int, int, int] = (32, 64, 96)  # pixel branch at 1/2, 1/4, 1/8
    decoder_channels: int = 64
    num_classes: int = 0  # defect classes; 0 when the line has no class labels
    self_similarity: bool = True  # novelty of each location against the rest of its image
    # "crop": named by a small CNN from a crop around the region the map marks (vision.crop_namer);
    # "mask": class evidence pooled where the map sees the defect, plus that region's shape and
    # appearance (region_stats); "mean": pooled over the whole image (model directories before "mask")
    class_pooling: str = "crop"
    # Laplacian-pyramid bands of the image and their self-similarity novelty at 1/8 resolution
    # (vision.bandpass): soft, large defects such as dents that the pixel branch sees too locally
    bandpass: bool = True
    # Where the class head looks at inference: "focus" = the pixels at or above half the map's
    # peak probability (a defect-shaped region like the masks it trains on); "soft" = the whole
    # probability map, whose faint background made every defect look large (model dirs before it)
    class_region: str = "focus"
    # oriented thin-line filter responses (vision.ridges) into the pixel branch, their peak per
    # 1/8 cell into the decoder: scratches one pixel wide that the branch does not learn in minutes
    ridges: bool = True
    # each 1/8 cell's hue against the rest of its image (vision.chroma): stains that change a grey
    # surface's colour more than its brightness. "pixel": into the decoder with the bands (s14, 20 CPU
    # minutes, two held-out metal lines: image AUROC 0.988 / 0.975 -> 0.9945 / 0.998, pixel 0.974 /
    # 0.942 -> 0.977 / 0.980); "image": only its peak, into the image-level evidence; "off"
    chroma: str = "pixel"

    def __post_init__(self) -> None:
        if self.class_pooling not in CLASS_POOLINGS:
            raise LineInspectError(f"head config: class_pooling {self.class_pooling!r} is not one of {CLASS_POOLINGS}; "
                                   "this model directory comes from another version: train it again")
        if self.chroma not in CHROMA_MODES:
            raise LineInspectError(f"head config: chroma {self.chroma!r} is not one of {CHROMA_MODES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        data = dict(data)
        data["stem_channels"] = tuple(data["stem_channels"])
        data.setdefault("self_similarity", False)  # model directories written before it existed
        data.setdefault("class_pooling", "mean")
        data.setdefault("bandpass", False)
        data.setdefault("class_region", "soft")
        data.setdefault("ridges", False)
        chroma = data.get("chroma", False)  # a bool in model directories before the "image" mode
        if chroma is True:
            raise LineInspectError("head config: this model directory's colour deviation (chroma: true) came from "
                                   "an earlier version that measured colour differently: train it again")
        data["chroma"] = chroma or "off"
        return cls(**data)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class PixelStem(nn.Module):
    """Three strided conv stages: (B,3,S,S) -> [(B,c1,S/2,S/2), (B,c2,S/4,S/4), (B,c3,S/8,S/8)]."""

    def __init__(self, channels: tuple[int, int, int], in_channels: int = 3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.s2 = nn.Sequential(conv_block(in_channels, c1, 2), conv_block(c1, c1))
        self.s4 = nn.Sequential(conv_block(c1, c2, 2), conv_block(c2, c2))
        self.s8 = nn.Sequential(conv_block(c2, c3, 2), conv_block(c3, c3))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        f2 = self.s2(images)
        f4 = self.s4(f2)
        f8 = self.s8(f4)
        return [f2, f4, f8]


def mask_pooled(region: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """Mean of each (B,C,h,w) feature map weighted by the defect probability there: a small
    defect's evidence is not averaged away by the good surface around it (as in a global mean).
    The weights carry no gradient, so naming a defect never reshapes where it is found."""
    h, w = features[0].shape[-2:]
    weight = F.adaptive_avg_pool2d(region.detach().float(), (h, w))  # (B,1,h,w)
    weight = weight / weight.sum((2, 3), keepdim=True).clamp_min(1e-6)
    return torch.cat([(f.float() * weight).sum((2, 3)) for f in features], 1).to(features[0].dtype)


def focus_region(prob: torch.Tensor, share: float | Sequence[float] = 0.5) -> torch.Tensor:
    """(B,1,S,S) defect probabilities -> {0,1} region: the pixels at or above `share` of each
    image's peak that connect to the peak. Where the defect is, shaped like a training mask,
    without the faint background probability that otherwise dominates the region's area and shape,
    and without a second, weaker spot elsewhere that would stretch the namer's crop around both
    (`tiny` on a held-out synthetic line: 0.817 -> 0.851 named right from the map's crops).
    Several shares give (len(share) * B, 1, S, S), share by share, grown in one pass.

    Connectivity is grown from the peak by 3x3 max pooling inside the region at a quarter of the
    resolution (gaps under 4 px join), a fixed number of steps: plain tensor work that a CUDA graph
    can hold, unlike a connected-components pass."""
    shares = [share] if isinstance(share, (int, float)) else list(share)
    peak = prob.flatten(1).amax(1).view(-1, 1, 1, 1)
    region = torch.cat([(prob >= s * peak) for s in shares]).to(prob.dtype)  # (len(shares) * B, 1, S, S)
    inside = F.max_pool2d(region, 4, ceil_mode=True)
    grown = F.max_pool2d((prob >= peak).to(prob.dtype), 4, ceil_mode=True).repeat(len(shares), 1, 1, 1)
    for _ in range(max(inside.shape[-2:])):
        grown = F.max_pool2d(grown, 3, 1, 1) * inside
    return region * F.interpolate(grown, scale_factor=4, mode="nearest")[..., : prob.shape[-2], : prob.shape[-1]]


REGION_STATS = 10


def region_stats(region: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Shape and appearance of the region the map marks, (B, REGION_STATS), no gradient: its
    area, length and width (second moments), elongation and peak, and how its colour and
    texture differ from the surface around it. What tells a scratch from a stain or a hole."""
    with torch.no_grad():
        p = F.avg_pool2d(region.detach().float(), 2)  # (B,1,h,w)
        b, _, h, w = p.shape
        mass = p.sum((1, 2, 3)).clamp_min(1e-3)
        ys = torch.linspace(-1, 1, h, device=p.device).view(1, 1, h, 1)
        xs = torch.linspace(-1, 1, w, device=p.device).view(1, 1, 1, w)
        my, mx = (p * ys).sum((1, 2, 3)) / mass, (p * xs).sum((1, 2, 3)) / mass
        dy, dx = ys - my.view(b, 1, 1, 1), xs - mx.view(b, 1, 1, 1)
        cyy, cxx, cxy = ((p * dy * dy).sum((1, 2, 3)) / mass, (p * dx * dx).sum((1, 2, 3)) / mass,
                         (p * dx * dy).sum((1, 2, 3)) / mass)
        half_gap = ((cyy - cxx) ** 2 / 4 + cxy**2).sqrt()
        major = ((cyy + cxx) / 2 + half_gap).clamp_min(1e-6).sqrt()
        minor = ((cyy + cxx) / 2 - half_gap).clamp_min(1e-6).sqrt()
        img = F.interpolate(images.detach().float(), size=(h, w), mode="area")  # (B,3,h,w)
        inside = (img * p).sum((2, 3)) / mass.view(b, 1)
        outside = (img * (1 - p)).sum((2, 3)) / (h * w - mass).clamp_min(1e-3).view(b, 1)
        gray = img.mean(1, keepdim=True)
        grad = (gray[..., 1:, :-1] - gray[..., :-1, :-1]).abs() + (gray[..., :-1, 1:] - gray[..., :-1, :-1]).abs()
        pc = p[..., :-1, :-1]
        texture_in = (grad * pc).sum((1, 2, 3)) / pc.sum((1, 2, 3)).clamp_min(1e-3)
        texture_out = (grad * (1 - pc)).sum((1, 2, 3)) / (1 - pc).sum((1, 2, 3)).clamp_min(1e-3)
        return torch.stack([
            (mass / (h * w)).clamp_min(1e-4).log(), major.log(), minor.log(), (major / minor).log(),
            p.flatten(1).amax(1), *(inside - outside).unbind(1), inside.mean(1) - outside.mean(1),
            (texture_in + 1e-3).log() - (texture_out + 1e-3).log(),
        ], 1)


class PixelFeatures(NamedTuple):
    """What the head sees in the pixels alone (``DefectHead.pixel_branch``); optional parts are
    None where the config leaves them out."""

    f2: torch.Tensor  # (B, c1, S/2, S/2) pixel branch
    f4: torch.Tensor  # (B, c2, S/4, S/4)
    f8: torch.Tensor  # (B, c3, S/8, S/8)
    novelty: torch.Tensor | None  # (B, 1, S/8, S/8) self-similarity novelty of f8
    bands: torch.Tensor | None  # (B, BANDPASS_CHANNELS, S/8, S/8) Laplacian-pyramid bands, fp32
    band_novelty: torch.Tensor | None  # (B, 1, S/8, S/8) their novelty, fp32
    line_peaks: torch.Tensor | None  # (B, 1, S/8, S/8) log1p of the thin-line filters' peak per cell
    chroma: torch.Tensor | None  # (B, CHROMA_CHANNELS, S/8, S/8) colour deviation from the image's own, fp32


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
        self.ridges = Ridges() if config.ridges else None
        self.stem = PixelStem(config.stem_channels, 3 + (RIDGE_CHANNELS if config.ridges else 0))
        self.vit_proj = nn.Sequential(
            nn.Conv2d(vit_dim * n_vit_layers, d, 1, bias=False), nn.BatchNorm2d(d), nn.GELU()
        )
        extra = sum(map(int, (config.self_similarity, config.bandpass, config.ridges)))  # novelty maps
        bands = (BANDPASS_CHANNELS if config.bandpass else 0) + (CHROMA_CHANNELS if config.chroma == "pixel" else 0)
        self.register_buffer("input_mean", torch.tensor(MEAN), persistent=False)
        self.register_buffer("input_std", torch.tensor(STD), persistent=False)
        self.bandpass = BandPass() if config.bandpass else None
        self.fuse8 = nn.Sequential(conv_block(d + c3 + extra + bands, d), conv_block(d, d))
        self.fuse4 = nn.Sequential(conv_block(d + c2, d), conv_block(d, d))
        # The half-resolution stage is the costliest per channel: squeeze before fusing there.
        self.squeeze2 = nn.Conv2d(d, c1, 1)
        self.fuse2 = conv_block(2 * c1, c1)
        self.mask_out = nn.Conv2d(c1, 1, 1)
        pooled = vit_dim + d + c3
        image_stats = 2 + extra + int(config.chroma == "image")
        self.image_out = nn.Sequential(nn.Linear(pooled + image_stats, d), nn.GELU(), nn.Linear(d, 1))
        self.class_out = self._class_layers(config, pooled, d, vit_dim, c3) if config.num_classes else None

    @staticmethod
    def _class_layers(config: HeadConfig, pooled: int, d: int, vit_dim: int, c3: int) -> nn.Module:
        if config.class_pooling == "crop":
            return CropNamer(config.num_classes)
        if config.class_pooling == "mask":
            # Region statistics and pooled features live on different scales: standardise them first.
            class_in = vit_dim + 2 * d + c3 + REGION_STATS
            return nn.Sequential(nn.BatchNorm1d(class_in), nn.Linear(class_in, d), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(d, config.num_classes))
        return nn.Sequential(nn.Linear(pooled, d), nn.GELU(), nn.Dropout(0.1), nn.Linear(d, config.num_classes))

    def _class_logits(self, images: torch.Tensor, mask_logits: torch.Tensor, class_region: torch.Tensor | None,
                      cls: torch.Tensor, vit8: torch.Tensor, x8: torch.Tensor, f8: torch.Tensor,
                      pooled: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) from where `class_region` says, else from the map (see ``forward``)."""
        pooling = self.config.class_pooling
        if pooling == "mean":
            return self.class_out(pooled)
        if class_region is not None:
            region = class_region
        else:
            prob = torch.sigmoid(mask_logits.detach().float())
            if self.config.class_region != "focus":
                region = prob
            elif pooling == "crop" and not self.training:
                return self._name_from_map(images, prob)
            else:
                region = focus_region(prob)
        if pooling == "crop":
            return self.class_out(crop_features(images, region))
        return self.class_out(torch.cat([cls, mask_pooled(region, [vit8, x8, f8]),
                                         region_stats(region, images).to(cls.dtype)], 1))

    def _name_from_map(self, images: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """Inference: the crop namer's log class probabilities averaged over crops cut around the map's
        focus region at each of NAMING_SHARES of its peak, (B, K)."""
        crops = crop_features(images, focus_region(prob, NAMING_SHARES))
        probs = self.class_out(crops).float().exp().view(len(NAMING_SHARES), len(images), -1)
        return probs.mean(0).clamp_min(1e-8).log()

    def pixel_branch(self, images: torch.Tensor) -> PixelFeatures:
        """Everything the head computes from the pixels alone, without the ViT's tokens: on a GPU
        it can run on a side stream while the encoder runs (``DefectModel.forward``)."""
        ridges = None
        if self.ridges is not None:
            with torch.autocast(images.device.type, enabled=False):  # faint lines need fp32
                ridges = self.ridges(images)
            f2, f4, f8 = self.stem(torch.cat([images, ridges.to(images.dtype)], 1))
        else:
            f2, f4, f8 = self.stem(images)
        novelty = self_similarity_map(f8) if self.config.self_similarity else None
        bands = band_novelty = None
        if self.bandpass is not None:
            with torch.autocast(images.device.type, enabled=False):  # faint shading needs fp32
                bands = self.bandpass(images, f8.shape[-2:])
                band_novelty = self_similarity_map(bands)
        line_peaks = None if ridges is None else ridge_peaks(ridges, f8.shape[-2:]).log1p()
        chroma = None
        if self.config.chroma != "off":
            chroma = chroma_deviation(images, f8.shape[-2:], (self.input_mean, self.input_std))
        return PixelFeatures(f2, f4, f8, novelty, bands, band_novelty, line_peaks, chroma)

    def forward(self, images: torch.Tensor, vit_features: list[torch.Tensor], cls: torch.Tensor,
                class_region: torch.Tensor | None = None, pixel: PixelFeatures | None = None) -> HeadOutput:
        """images (B,3,S,S); vit_features: per layer (B,C,h,w); cls (B,C). `class_region` (B,1,S,S)
        in [0,1]: where to look when naming the defect (training passes the true masks, so the
        class head learns from the start; otherwise the predicted map). `pixel`: this head's
        ``pixel_branch(images)`` when the caller computed it already."""
        f2, f4, f8, novelty, bands, band_novelty, line_peaks, chroma = (
            pixel if pixel is not None else self.pixel_branch(images))
        v = self.vit_proj(torch.cat(vit_features, dim=1))  # (B, d, h, w)
        at8 = [upsample_bilinear(v, f8.shape[-2:]), f8]
        if novelty is not None:
            at8.append(novelty.log().to(f8.dtype))
        if bands is not None:
            at8 += [bands.to(f8.dtype), band_novelty.log().to(f8.dtype)]
        if line_peaks is not None:
            at8.append(line_peaks.to(f8.dtype))
        if chroma is not None and self.config.chroma == "pixel":
            at8.append(chroma.to(f8.dtype))
        x8 = self.fuse8(torch.cat(at8, 1))
        x = self.fuse4(torch.cat([upsample_bilinear(x8, f4.shape[-2:]), f4], 1))
        x = upsample_bilinear(self.squeeze2(x), f2.shape[-2:])
        x = self.fuse2(torch.cat([x, f2], 1))
        mask_logits = upsample_bilinear(self.mask_out(x), images.shape[-2:])
        # Image-level evidence: pooled semantics plus the peak and mean of the map itself.
        pooled = torch.cat([cls, v.mean((2, 3)), f8.mean((2, 3))], 1)  # (B, C + d + c3)
        peak = F.max_pool2d(mask_logits, 8).flatten(1)
        stats = [peak.max(1).values, mask_logits.flatten(1).mean(1)]
        if novelty is not None:
            stats.append(novelty.flatten(1).amax(1).log().to(peak.dtype))
        if band_novelty is not None:
            stats.append(band_novelty.flatten(1).amax(1).log().to(peak.dtype))
        if line_peaks is not None:
            stats.append(line_peaks.flatten(1).amax(1).to(peak.dtype))
        if chroma is not None and self.config.chroma == "image":  # the part's most off-colour cell
            stats.append(chroma[:, -1].flatten(1).amax(1).to(peak.dtype))
        image_logit = self.image_out(torch.cat([pooled, torch.stack(stats, 1)], 1)).squeeze(1)
        class_logits = None if self.class_out is None else self._class_logits(
            images, mask_logits, class_region, cls, at8[0], x8, f8, pooled)
        return HeadOutput(mask_logits, image_logit, class_logits, novelty)
