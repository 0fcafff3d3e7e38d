"""The fast defect model: ViT encoder + multi-scale defect head + patch memory bank + region statistics.

Pure torch: no file I/O; device and dtype come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lineinspect.vision.encoder import EncoderConfig, VisionEncoder
from lineinspect.vision.heads import DefectHead, HeadConfig, HeadOutput
from lineinspect.vision.memory_bank import PatchMemoryBank, patch_descriptors
from lineinspect.vision.preprocess import MEAN, STD
from lineinspect.vision.region_stats import RegionStatsBank

# ImageNet statistics; also what timm and CLIP-style checkpoints expect within rounding.


@dataclass(frozen=True)
class DefectModelConfig:
    encoder: EncoderConfig
    head: HeadConfig
    memory_bank_size: int = 2048  # coreset patches kept from good images
    region_bank_size: int = 8192  # good regions' statistics kept per scale (vision.region_stats)
    map_smoothing: int = 5  # box filter (px at model resolution) before taking the map's peak


class DefectOutput(NamedTuple):
    anomaly_map: torch.Tensor  # (B, 1, S, S) defect probability per pixel
    map_score: torch.Tensor  # (B,) peak of the smoothed map
    image_prob: torch.Tensor  # (B,) image-level defect probability
    memory_map: torch.Tensor | None  # (B, 1, S, S) nearest-neighbour distance, when the bank is fitted
    novelty_score: torch.Tensor | None  # (B,) peak self-similarity novelty, when the head computes it
    class_logits: torch.Tensor | None  # (B, K)
    cls: torch.Tensor  # (B, C) encoder class token (for the language path)
    patches: torch.Tensor  # (B, N, C) encoder patch tokens (for the language path)
    region_score: torch.Tensor | None = None  # (B,) regional grey-level statistics, when that bank is fitted
    region_map: torch.Tensor | None = None  # (B, 1, S, S) their per-pixel map (its peak is at most the score)


class DefectModel(nn.Module):
    def __init__(self, config: DefectModelConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        self.encoder = VisionEncoder(enc)
        self.head = DefectHead(config.head, enc.embed_dim, len(enc.feature_layers))
        self.memory = PatchMemoryBank(enc.embed_dim * len(enc.feature_layers), config.memory_bank_size)
        self.regions = RegionStatsBank(config.region_bank_size)
        # Masked patch reconstruction (self-supervision on good images): a learned mask token
        # replaces hidden patches and a linear layer predicts their pixels.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.recon = nn.Linear(enc.embed_dim, enc.patch_size * enc.patch_size * 3)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.overlap_pixel_branch = True  # CUDA inference: the head's pixel branch on a side stream; off for A/B
        self._side: torch.cuda.Stream | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) float in [0,1] -> normalised input, in the weights' type (a bf16 copy for CUDA graphs
        is given fp32 frames)."""
        return ((images - self.mean) / self.std).to(self.mean.dtype)

    def logits(self, images: torch.Tensor, class_region: torch.Tensor | None = None) -> HeadOutput:
        """Training view: raw head logits for images (B, 3, S, S) float in [0, 1]; `class_region`
        (B, 1, S, S): the true defect masks, where the class head should look."""
        x = self.normalize(images)
        enc = self.encoder(x)
        return self.head(x, enc.features, enc.cls, class_region)

    def descriptors(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Memory-bank descriptors (B, N, D) and the patch grid for images in [0, 1]."""
        enc = self.encoder(self.normalize(images))
        return patch_descriptors(enc.features), enc.grid

    def forward(self, images: torch.Tensor, use_memory: bool = True, bank_fitted: bool | None = None) -> DefectOutput:
        """images: (B, 3, S, S) float in [0, 1] (normalisation happens here).

        With `use_memory` the memory bank's map is added when the bank is fitted, and the region
        statistics' score when they are (fitted with it; models saved before them have none). `bank_fitted`
        says whether the bank is when the caller knows; otherwise the flag is read from the device, a host
        sync that CUDA graph capture does not allow (the region statistics' flag is read on the host at fit
        and load time).
        """
        x = self.normalize(images)
        side = self._side_stream(x)
        if side is None:
            pixel = None
            enc = self.encoder(x)
        else:  # the head's pixel branch needs no ViT tokens: run it beside the encoder
            main = torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                pixel = self.head.pixel_branch(x)
            enc = self.encoder(x)
            main.wait_stream(side)
            # The branch's tensors are used and freed on the main stream; the side stream reuses
            # their memory only in a later call, after it waits for the main stream again (above).
        cls_token = enc.cls
        head = self.head(x, enc.features, cls_token, pixel=pixel)
        prob = torch.sigmoid(head.mask_logits.float())
        k = self.config.map_smoothing
        smooth = F.avg_pool2d(prob, k, 1, k // 2, count_include_pad=False) if k > 1 else prob
        memory_map = region_score = region_map = None
        if use_memory and (bool(self.memory.fitted) if bank_fitted is None else bank_fitted):
            dist = self.memory(patch_descriptors(enc.features), enc.grid)
            memory_map = F.interpolate(dist, size=images.shape[-2:], mode="bilinear")
            if self.regions.ready:
                region_score, region_map = self.regions(images)
        novelty_score = None
        if head.novelty is not None:
            novelty_score = F.avg_pool2d(head.novelty.float(), 3, 1, 1, count_include_pad=False).flatten(1).amax(1)
        return DefectOutput(
            anomaly_map=prob,
            map_score=smooth.flatten(1).max(1).values,
            image_prob=torch.sigmoid(head.image_logit.float()),
            memory_map=memory_map,
            novelty_score=novelty_score,
            class_logits=head.class_logits,
            cls=cls_token,
            patches=enc.patches,
            region_score=region_score,
            region_map=region_map,
        )

    def _side_stream(self, x: torch.Tensor) -> torch.cuda.Stream | None:
        """The stream for the head's pixel branch beside the encoder: CUDA inference only (at
        batch 1 neither fills an H200 alone), and only where ``overlap_pixel_branch`` is on."""
        if not (self.overlap_pixel_branch and x.is_cuda and not torch.is_grad_enabled()):
            return None
        if self._side is None or self._side.device != x.device:
            self._side = torch.cuda.Stream(x.device)
        return self._side

    def __getstate__(self) -> dict:
        """Copies and pickles leave the side stream behind (a CUDA stream cannot be copied)."""
        state = dict(super().__getstate__())
        state["_side"] = None
        return state

    def masked_reconstruction_loss(self, images: torch.Tensor, mask_ratio: float = 0.5) -> torch.Tensor:
        """SimMIM-style self-supervision: hide a random subset of patches, predict their pixels.

        images: (B, 3, S, S) float in [0, 1]. Loss is L1 on per-patch-normalised pixels of hidden patches.
        """
        vit = self.encoder.vit
        p = self.config.encoder.patch_size
        x = self.normalize(images)
        tokens = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        b, h, w, c = tokens.shape
        hidden = torch.rand(b, h, w, 1, device=x.device) < mask_ratio  # (B, h, w, 1)
        tokens = torch.where(hidden, self.mask_token.view(1, 1, 1, c).to(tokens.dtype), tokens)
        tokens = vit._pos_embed(tokens)
        tokens = vit.norm_pre(tokens)
        tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)[:, vit.num_prefix_tokens :]  # (B, h*w, C)
        pred = self.recon(tokens)  # (B, h*w, p*p*3)
        target = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, h*w, 3*p*p)
        target = (target - target.mean(-1, keepdim=True)) / (target.std(-1, keepdim=True) + 1e-4)
        sel = hidden.view(b, h * w)
        return (pred - target).abs().mean(-1)[sel].mean()
