"""Band-pass (Laplacian pyramid) features: what the surface looks like at each scale.

A from-scratch network trained for minutes learns texture edges first and soft, large changes
last: a dent's light/dark shading pair or a faint stain is tens of pixels across and only a few
grey levels deep, beyond the receptive field of the pixel branch and drowned by texture in its
features. A Laplacian pyramid separates those scales with fixed filters: a lighting gradient
falls below its coarsest band, brushing grain into its finest, and a dent lands in one band in
between. Each band is normalised by its own spread in the image, so the head sees "how unusual
for this part" rather than absolute contrast. Fixed convolutions only: no training and no host
syncs. The blur kernel is a buffer of the `BandPass` module (not part of the state dict), so it
moves with the model and nothing is copied from the host inside a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 5  # bands at 1, 1/2, 1/4, 1/8, 1/16 of the input resolution
BANDPASS_CHANNELS = 2 * LEVELS  # per band: signed response and local energy

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # the classic pyramid kernel (Burt and Adelson)


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap blur of (B,1,H,W) with `kernel` (5,), edges reflected."""
    x = F.pad(x, (2, 2, 2, 2), mode="reflect") if min(x.shape[-2:]) > 2 else F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5))
    return F.conv2d(x, kernel.view(1, 1, 5, 1))


def binomial_kernel(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(_BINOMIAL, device=device) / 16


def bandpass_features(images: torch.Tensor, out_size: tuple[int, int],
                      kernel: torch.Tensor | None = None) -> torch.Tensor:
    """images (B,3,S,S), any affine intensity scale -> (B, BANDPASS_CHANNELS, *out_size) float32.

    For each pyramid band: the band itself and its rectified energy, averaged into the output
    grid and divided by the band's standard deviation over the image. `kernel`: the binomial
    kernel already on the images' device (`BandPass` keeps one); made here if None."""
    kernel = (binomial_kernel(images.device) if kernel is None else kernel).float()
    gray = images.float().mean(1, keepdim=True)
    feats = []
    level = gray
    for _ in range(LEVELS):
        down = F.avg_pool2d(_blur(level, kernel), 2)
        band = level - F.interpolate(down, size=level.shape[-2:], mode="bilinear", align_corners=False)
        scale = band.flatten(1).std(1).clamp_min(1e-4).view(-1, 1, 1, 1)
        band = band / scale
        energy = _blur(band.abs(), kernel)
        for f in (band, energy):
            feats.append(F.adaptive_avg_pool2d(f, out_size) if f.shape[-1] >= out_size[-1]
                         else F.interpolate(f, size=out_size, mode="bilinear", align_corners=False))
        level = down
    return torch.cat(feats, 1)


class BandPass(nn.Module):
    """`bandpass_features` with its kernel held as a (non-persistent) buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", binomial_kernel(), persistent=False)

    def forward(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return bandpass_features(images, out_size, self.kernel)
