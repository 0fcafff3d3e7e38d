"""Colour deviation: how far each location's hue lies from the rest of its own image.

The band-pass and thin-line filters read grey levels only, and a from-scratch pixel branch trained for
minutes learns texture before colour, so a rust or oil stain that changes the hue of a grey surface
more than its brightness went unseen (`s14`, 20 CPU minutes: a clearly visible rust stain on bright grey
scored 0.355, the line's worst miss). Here the colour of each output cell is averaged, turned into two
log-chromaticity ratios (red against green, red+green against blue), the image median is taken off, and
the rest is divided by the image's own robust spread of them: "how unusual a colour for this part",
whatever the surface's own tint. Ratios, not opponent differences (red minus green): shading multiplies
every channel alike, so a dent on a tinted part changed red minus green but leaves the ratios alone
(with differences in the decoder, `s14`'s dents lost 0.05-0.09 pixel AUROC).
Fixed tensor work, no host syncs (CUDA-graph safe).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHROMA_CHANNELS = 3  # red-green and yellow-blue deviation, and their magnitude
DARK = 4.0 / 255  # added to every channel: near-black cells carry no trustworthy hue
SPREAD_FLOOR = 0.015  # an evenly coloured part: ratio spreads below ~2 grey levels at mid-grey count as that much


def chroma_deviation(images: torch.Tensor, out_size: tuple[int, int],
                     normalization: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """images (B,3,S,S) RGB in [0, 1], or normalised per channel with `normalization` = (mean, std),
    each (3,) -> (B, CHROMA_CHANNELS, *out_size) float32, compressed with asinh."""
    x = images.float()
    if normalization is not None:
        mean, std = normalization
        x = x * std.float().view(1, 3, 1, 1) + mean.float().view(1, 3, 1, 1)
    r, g, b = (F.adaptive_avg_pool2d(x, out_size).clamp_min(0) + DARK).log().unbind(1)
    ratios = torch.stack((r - g, torch.logaddexp(r, g) - math.log(2) - b), 1).flatten(2)  # (B, 2, h*w)
    deviation = ratios - ratios.median(-1, keepdim=True).values
    spread = (deviation.abs().median(-1, keepdim=True).values * 1.4826).clamp_min(SPREAD_FLOOR)
    z = deviation / spread
    z = torch.cat((z, z.square().sum(1, keepdim=True).sqrt()), 1)
    return torch.asinh(z).view(len(x), CHROMA_CHANNELS, *out_size)
