"""Oriented ridge (thin line) features: where a scratch or crack crosses the surface.

A scratch is one or two pixels wide at model resolution, often fainter than the surface's own
grain. Averaged into the 1/8 grid of the rest of the head it all but vanishes, and the pixel
branch needs far more steps than a few CPU minutes give to learn a line detector from scratch.
These are the classic fixed line filters instead: the second derivative of an elongated Gaussian
across the line, at a few orientations and two widths. Each response map is divided by its own
spread over the image, so a brushing grain that fills one orientation everywhere is normalised
down while a line at another angle stands out. On the synthetic metal line at 128 px, the peak
of these maps alone (no training) separates scratched from good parts at image AUROC 0.99 (the
`tiny` head trained 3 minutes without them: 0.81; bench/RESULTS.md).

The head gets the maps at full resolution as extra input channels of its pixel branch, and their
peak per 1/8 cell as a novelty map. Fixed convolutions, kernels in a non-persistent buffer (no
host copies inside a CUDA graph). The bank is one input channel and eight 15x15 filters: direct
convolution spends most of its time on memory and launch overhead for so little arithmetic, so on
a GPU it is computed as a product of real Fourier transforms instead, which gives the same
responses to float32 rounding (H100, 64 images at 224 px: 2.12 ms by cuDNN, 0.85 ms by FFTs;
bench/head_kernels.py). On a CPU the direct convolution stays (oneDNN runs it well; the
transforms were slower there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ORIENTATIONS = 4
WIDTHS = (0.7, 1.4)  # Gaussian sigma across the line, in model pixels
ELONGATION = 2.5  # sigma along the line / sigma across
RIDGE_CHANNELS = ORIENTATIONS * len(WIDTHS)


def ridge_kernels() -> torch.Tensor:
    """(RIDGE_CHANNELS, 1, k, k) zero-mean line filters, all padded to the largest size."""
    radius = math.ceil(3 * max(WIDTHS) * ELONGATION / 1.5)
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    y, x = torch.meshgrid(r, r, indexing="ij")
    kernels = []
    for sigma in WIDTHS:
        for i in range(ORIENTATIONS):
            t = math.pi * i / ORIENTATIONS
            across = x * math.cos(t) + y * math.sin(t)
            along = -x * math.sin(t) + y * math.cos(t)
            g = torch.exp(-across**2 / (2 * sigma**2) - along**2 / (2 * (ELONGATION * sigma) ** 2))
            k = (across**2 / sigma**4 - 1 / sigma**2) * g
            k = k - k.mean()
            kernels.append(k / k.abs().sum())
    return torch.stack(kernels).unsqueeze(1)


def ridge_features(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """images (B,3,S,S), any affine intensity scale -> (B, RIDGE_CHANNELS, S, S) float32: each
    filter's response divided by its standard deviation over the image."""
    # fp32 also in the bf16 CUDA graphs: on an H200 cuDNN ran this one-channel 15x15 bank in bf16
    # without tensor cores, 5.2 ms per batch of 64 against 3.0 ms in fp32 (and FFTs need fp32).
    gray = images.float().mean(1, keepdim=True)
    pad = kernels.shape[-1] // 2
    mode = "reflect" if min(gray.shape[-2:]) > pad else "replicate"
    padded = F.pad(gray, (pad, pad, pad, pad), mode=mode)
    response = correlate_fft(padded, kernels.float()) if padded.is_cuda else F.conv2d(padded, kernels.float())
    return response / channel_std(response).clamp_min(1e-4)


def channel_std(x: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, 1, 1): each map's standard deviation (unbiased, as `torch.std`). Written
    out because on a CPU `torch.std` over a few long rows runs one thread's Welford loop: 1.16 ms for
    8 x 224 x 224 values on the 2-core host against 0.09 ms for these two passes."""
    flat = x.flatten(2)
    centred = flat - flat.mean(2, keepdim=True)
    return (centred.square().sum(2) / max(flat.shape[2] - 1, 1)).sqrt()[..., None, None]


def correlate_fft(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """F.conv2d(x, kernels) (a 'valid' cross-correlation) through real FFTs: x (B, 1, H, W), kernels
    (K, 1, k, k) -> (B, K, H - k + 1, W - k + 1). The circular correlation of x with the zero-padded
    kernels equals the linear one wherever the kernel stays inside x, which is the valid region."""
    h, w = x.shape[-2:]
    kh, kw = kernels.shape[-2:]
    spectrum = torch.fft.rfft2(x, s=(h, w)) * torch.fft.rfft2(kernels, s=(h, w)).conj().transpose(0, 1)
    return torch.fft.irfft2(spectrum, s=(h, w))[..., : h - kh + 1, : w - kw + 1]


def ridge_peaks(ridges: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """(B, RIDGE_CHANNELS, S, S) -> (B, 1, *out_size): the strongest line response in each cell."""
    return F.adaptive_max_pool2d(ridges.abs().amax(1, keepdim=True), out_size)


class Ridges(nn.Module):
    """`ridge_features` with its kernels held as a (non-persistent) buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernels", ridge_kernels(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ridge_features(images, self.kernels)
