"""Colour deviation: how far each location's hue lies from the rest of its own image.

The band-pass and thin-line filters read grey levels only, and a from-scratch pixel branch trained for
minutes learns texture before colour, so a rust or oil stain that changes the hue of a grey surface
more than its brightness went unseen (`s14`, 20 CPU minutes: a clearly visible rust stain on bright grey
scored 0.355, the line's worst miss). Here the image's two opponent-colour planes (red-green and
yellow-blue, free of brightness) are averaged over each output cell, their image median is taken off, and
the rest is divided by the image's own robust spread of them: "how unusual a colour for this part",
whatever the surface's own tint. Fixed tensor work, no host syncs (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHROMA_CHANNELS = 3  # red-green and yellow-blue deviation, and their magnitude
SPREAD_FLOOR = 2.0 / 255  # an evenly grey part: spreads below about two grey levels count as that much


def chroma_deviation(images: torch.Tensor, out_size: tuple[int, int], std: torch.Tensor | None = None) -> torch.Tensor:
    """images (B,3,S,S), RGB, normalised per channel by `std` (3,) (None: not normalised) ->
    (B, CHROMA_CHANNELS, *out_size) float32, compressed with asinh."""
    x = images.float()
    if std is not None:  # back to a common scale per channel (the mean offsets cancel below)
        x = x * std.float().view(1, 3, 1, 1)
    r, g, b = x.unbind(1)
    opponent = torch.stack((r - g, (r + g) / 2 - b), 1)  # (B, 2, S, S)
    cells = F.adaptive_avg_pool2d(opponent, out_size).flatten(2)  # (B, 2, h*w)
    deviation = cells - cells.median(-1, keepdim=True).values
    spread = (deviation.abs().median(-1, keepdim=True).values * 1.4826).clamp_min(SPREAD_FLOOR)
    z = deviation / spread
    z = torch.cat((z, z.square().sum(1, keepdim=True).sqrt()), 1)
    return torch.asinh(z).view(len(x), CHROMA_CHANNELS, *out_size)
