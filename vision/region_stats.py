"""Regional grey-level statistics of good images (a training-free score beside the learned ones).

Each image is cut into overlapping square regions at two scales (half and a quarter of its side,
stride half a region); a region is described by the mean, spread and four quantiles (1, 10, 90,
99 %) of its grey levels, and an image scores the largest distance, over its regions, to the
nearest good regions (mean of the 5 nearest, in units of the good regions' spread). It is the
classic machine-vision check of "is this area darker, brighter or blotchier than good parts ever
are", and it needs no learned features: on the real-steel lines (bench/neu_unseen.sh), where a
from-scratch encoder's features are weakest, it alone scored a mean image AUROC of 0.91, and averaged
into the fused score it lifted the trained `tiny` models from 0.88 to 0.90-0.91 (bench/RESULTS.md, session 26).

It also gives a map: each pixel takes the score of the most unusual region covering it, so what the
statistics flag can be boxed. On those lines that map alone reached a pixel AUROC of 0.89 where the
head's map reached 0.62 (session 27).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALES = (0.5, 0.25)  # region side as a share of the image side
QUANTILES = (0.01, 0.1, 0.9, 0.99)
STATS = 2 + len(QUANTILES)  # mean, standard deviation, quantiles
NEIGHBOURS = 5
FAR = 1e4  # where unused bank rows sit, so they are never among the nearest
LEVELS = 256  # grey levels of the quantiles' histograms
CHUNK = 64  # images converted and scored at a time while fitting


def region_stats(images: torch.Tensor, scale: float, quantiles: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B, R, STATS): the statistics of each region at `scale`.

    Quantiles come from each region's 256-level histogram (to half a grey level of the sorted pixels): a
    sort of every region's pixels cost 2.2 ms a scale for one 168 px image on a 2-core CPU, the
    histogram 0.15 ms, and neither needs the host, so CUDA graphs can hold it if `quantiles` (QUANTILES as
    a tensor) is given on the images' device: made here, it is a copy from the host, which a graph cannot
    capture."""
    grey = images.float().mean(1)
    side = max(4, round(grey.shape[-1] * scale))
    step = max(1, side // 2)

    def regions(x: torch.Tensor) -> torch.Tensor:  # (B, S, S) -> (B * R, side^2)
        return x.unfold(1, side, step).unfold(2, side, step).flatten(3).flatten(0, 2)

    cells = regions(grey)
    levels = regions((grey * (LEVELS - 1)).round_().clamp_(0, LEVELS - 1).long())
    counts = torch.zeros(len(levels), LEVELS, device=grey.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float32))
    if quantiles is None:
        quantiles = torch.tensor(QUANTILES, device=grey.device)
    ranks = (quantiles * (cells.shape[1] - 1)).round() + 1  # 1-based order statistics
    at_ranks = torch.searchsorted(counts.cumsum(1), ranks.expand(len(cells), -1).contiguous()) / (LEVELS - 1)
    stats = torch.cat([cells.mean(1, keepdim=True), cells.std(1, keepdim=True), at_ranks], 1)
    return stats.view(len(grey), -1, STATS)


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as floats in [0, 1]; float images as they are."""
    return images.float().div(255) if images.dtype == torch.uint8 else images


class RegionStatsBank(nn.Module):
    """The good regions' statistics per scale, standardised, and each scale's score on held-out goods."""

    def __init__(self, size: int) -> None:
        super().__init__()
        n = len(SCALES)
        self.register_buffer("bank", torch.full((n, size, STATS), FAR))
        self.register_buffer("centre", torch.zeros(n, STATS))
        self.register_buffer("spread", torch.ones(n, STATS))
        self.register_buffer("ref_mean", torch.zeros(n))  # the per-image score of good images held out of the bank
        self.register_buffer("ref_std", torch.ones(n))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("quantiles", torch.tensor(QUANTILES), persistent=False)  # on the device, for graphs
        # Read on the host once, when fitted or loaded, so forward passes (and CUDA graphs) need no sync.
        self.ready = False
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "ready", bool(module.fitted)))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, seed: int = 0) -> None:
        """images: (N, 3, S, S) good images, uint8 or float in [0, 1]; every tenth one is held out as the
        reference. Converted and scored a chunk at a time, so a line of thousands fits in little memory."""
        held_out = torch.arange(len(images), device=images.device) % 10 == 0
        banked = ~held_out
        if len(images) < 10:  # too few to hold any out: the reference is the banked images themselves
            held_out = banked = torch.ones_like(held_out)
        g = torch.Generator().manual_seed(seed)
        size = self.bank.shape[1]
        for i, scale in enumerate(SCALES):
            chunks = images.split(CHUNK)
            stats = torch.cat([region_stats(unit_range(c), scale, self.quantiles) for c in chunks])  # (N, R, STATS)
            centre, spread = stats.flatten(0, 1).mean(0), stats.flatten(0, 1).std(0).clamp_min(1e-6)
            rows = ((stats[banked] - centre) / spread).flatten(0, 1)
            if len(rows) > size:
                rows = rows[torch.randperm(len(rows), generator=g)[:size].to(rows.device)]
            self.bank[i].fill_(FAR)
            self.bank[i, : len(rows)] = rows
            self.centre[i], self.spread[i] = centre, spread
            ref = torch.cat([self._scale_scores(part, i) for part in stats[held_out].split(CHUNK)])
            self.ref_mean[i], self.ref_std[i] = ref.mean(), ref.std().clamp_min(1e-6) if len(ref) > 1 else 1.0
        self.fitted.fill_(True)
        self.ready = True

    def _region_distances(self, stats: torch.Tensor, i: int) -> torch.Tensor:
        """(B, R, STATS) region statistics at scale i -> (B, R): each region's mean distance to the
        NEIGHBOURS nearest good regions."""
        z = (stats - self.centre[i]) / self.spread[i]
        dist = torch.cdist(z.flatten(0, 1), self.bank[i])  # (B * R, size)
        return dist.topk(NEIGHBOURS, dim=1, largest=False).values.mean(1).view(len(stats), -1)

    def _scale_scores(self, stats: torch.Tensor, i: int) -> torch.Tensor:
        """(B, R, STATS) -> (B,): the most unusual region's distance."""
        return self._region_distances(stats, i).amax(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> the image score (B,), the largest per-scale score, each standardised by
        held-out goods, and its map (B, 1, S, S): at each pixel the largest standardised score of the regions
        covering it, smoothed bilinearly (a smooth map localised better than blocks: pixel AUROC 0.886
        against 0.879 on the real-steel lines)."""
        size = images.shape[-2:]
        with torch.autocast(images.device.type, enabled=False):
            scores, maps = [], []
            for i, scale in enumerate(SCALES):
                stats = region_stats(images, scale, self.quantiles)
                z = (self._region_distances(stats, i) - self.ref_mean[i]) / self.ref_std[i]
                scores.append(z.amax(1))
                n = round(z.shape[1] ** 0.5)  # regions overlap by half: a pixel cell lies in the 2 x 2 around it
                cells = F.max_pool2d(z.view(len(z), 1, n, n), 2, stride=1, padding=1)
                maps.append(F.interpolate(cells, size=size, mode="bilinear", align_corners=False))
        return torch.stack(scores).amax(0), torch.stack(maps).amax(0)
