"""Self-similarity: how unlike the rest of its own image each location is.

Industrial surfaces repeat themselves (brushed grain, weave, tiles, copper traces), so a
location whose features have no close match anywhere else in the same image - outside its
own neighbourhood - is suspicious, whatever the defect and whatever the lighting or texture of
this particular part. This needs no training data at all and complements the learned head
(which knows what defects look like) and the memory bank (which knows what good parts look
like). Distances are one batched matrix product per image chunk, so it runs on any device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _grid_exclusion(h: int, w: int, radius: float, device: torch.device, inference: bool) -> torch.Tensor:
    """(h*w, h*w) bool: True where two grid cells are closer than `radius` cells.

    Cached per inference-mode state too: a tensor made under `torch.inference_mode` cannot take
    part in a later training step.
    """
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
    return torch.cdist(pos, pos) < radius


def self_similarity_map(features: torch.Tensor, k: int = 8, exclude_radius: float = 3.0) -> torch.Tensor:
    """features (B, C, h, w) -> (B, 1, h, w) relative novelty of each location.

    Each location's mean distance to its k nearest feature neighbours elsewhere in the image
    (cells within `exclude_radius` do not count), divided by the image's median of that value,
    so 1 means "as typical as most of this image" whatever the texture's own variability.
    """
    b, c, h, w = features.shape
    x = features.float().flatten(2).transpose(1, 2)  # (B, N, C)
    sq = (x * x).sum(-1)  # (B, N)
    with torch.autocast(features.device.type, enabled=False):  # float32: the expanded form cancels (memory_bank)
        d2 = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2)  # (B, N, N)
    near = _grid_exclusion(h, w, exclude_radius, features.device, torch.is_inference_mode_enabled())
    d2 = d2.masked_fill(near, float("inf"))
    r = math.ceil(exclude_radius)
    most_excluded = sum(dy * dy + dx * dx < exclude_radius**2 for dy in range(-r, r + 1) for dx in range(-r, r + 1))
    k = max(1, min(k, h * w - most_excluded))  # plain Python: no device sync (CUDA graphs)
    knn = d2.topk(k, dim=-1, largest=False).values.clamp_min(0).add(1e-8).sqrt().mean(-1)  # (B, N)
    rel = knn / knn.median(dim=1, keepdim=True).values.clamp_min(1e-6)
    return rel.view(b, 1, h, w)
