"""Bilinear resizing of feature maps as two matrix products on GPUs.

PyTorch's CUDA kernel for bilinear resizing of NCHW tensors gives each thread one output pixel and
loops it over every (image, channel) plane, so a map with few pixels and many planes runs on a few
hundred threads: the head's four resizes of a batch of 64 cost 2.4 ms of a 48 ms `l14` Inspector
call on an H100 (bench/RESULTS.md), more than its attention. Bilinear resizing is separable and
linear, so it is also ``Mh @ x @ Mw.T`` with fixed (out, in) matrices, which run as ordinary
(batched) GEMMs. The matrices are the ones the frames are resized with (`preprocess.resize_matrix`,
mode "linear": OpenCV's and ``F.interpolate``'s bilinear share half-pixel centres and clamped edges;
tests/vision/test_upsampling.py holds them to ``F.interpolate``).

CPUs keep ``F.interpolate``, which is fast there and needs no matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lineinspect.vision.preprocess import resize_matrix


def resize_by_matrices(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resizing of (B, C, H, W) x to `size` as ``rows @ x @ cols.T``, on any device."""
    rows = resize_matrix(x.shape[-2], size[0], "linear", 1.0, x.device, x.dtype)  # (h, H)
    cols = resize_matrix(x.shape[-1], size[1], "linear", 1.0, x.device, x.dtype)  # (w, W)
    return torch.matmul(rows, x @ cols.T)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for (B, C, H, W) x: matrix
    products on CUDA, the library's kernel elsewhere."""
    if x.is_cuda:
        return resize_by_matrices(x, size)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
