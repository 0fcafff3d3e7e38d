"""Band-pass (Laplacian pyramid) features: what the surface looks like at each scale.

A from-scratch network trained for minutes learns texture edges first and soft, large changes
last: a dent's light/dark shading pair or a faint stain is tens of pixels across and only a few
grey levels deep, beyond the receptive field of the pixel branch and drowned by texture in its
features. A Laplacian pyramid separates those scales with fixed filters: a lighting gradient
falls below its coarsest band, brushing grain into its finest, and a dent lands in one band in
between. Each band is normalised by its own spread in the image, so the head sees "how unusual
for this part" rather than absolute contrast. Fixed convolutions only: no training and no host
syncs. The blur kernel is a buffer of the `BandPass` module (not part of the state dict), so it
moves with the model; on CUDA the blur runs as products with banded matrices made at the first call
(a CUDA graph's warm-up), so nothing is copied from the host inside a graph either.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 5  # bands at 1, 1/2, 1/4, 1/8, 1/16 of the input resolution
BANDPASS_CHANNELS = 2 * LEVELS  # per band: signed response and local energy

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # the classic pyramid kernel (Burt and Adelson)


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap blur of (B,1,H,W) with `kernel` (5,), edges reflected (replicated below 3 px).

    On CUDA as two products with banded (n, n) matrices of the binomial kernel: a one-channel fp32
    convolution runs there as an implicit GEMM that cost 1.1 ms per 64 `l14` images (bench/RESULTS.md)."""
    reflect = min(x.shape[-2:]) > 2
    if x.is_cuda:
        rows = blur_matrix(x.shape[-2], reflect, x.device)
        cols = blur_matrix(x.shape[-1], reflect, x.device)
        return torch.matmul(rows, x @ cols.T)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect" if reflect else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5))
    return F.conv2d(x, kernel.view(1, 1, 5, 1))


@lru_cache(maxsize=32)
def blur_matrix(n: int, reflect: bool, device: torch.device) -> torch.Tensor:
    """(n, n) float32: the 1-D binomial blur over n samples with reflected (or replicated) edges, as
    `_blur` pads them. Cached per size and device (made at the first, uncaptured call), outside
    inference mode so that training may use it too."""
    with torch.inference_mode(False), torch.no_grad():
        taps = torch.arange(-2, 3, device=device)
        src = torch.arange(n, device=device)[:, None] + taps  # (n, 5)
        if reflect:
            src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))
        else:
            src = src.clamp(0, n - 1)
        kernel = binomial_kernel(device).expand(n, 5)
        return torch.zeros(n, n, device=device).scatter_add_(1, src, kernel)


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
