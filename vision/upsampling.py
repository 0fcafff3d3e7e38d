"""Bilinear resizing of feature maps as two matrix products on GPUs.

PyTorch's CUDA kernel for bilinear resizing of NCHW tensors gives each thread one output pixel and
loops it over every (image, channel) plane, so a map with few pixels and many planes runs on a few
hundred threads: the head's four resizes of a batch of 64 cost 2.4 ms of a 48 ms `l14` Inspector
call on an H100 (bench/RESULTS.md), more than its attention. Bilinear resizing is separable and
linear, so it is also ``Mh @ x @ Mw.T`` with fixed (out, in) matrices, which run as ordinary
(batched) GEMMs. The matrices are made by resizing the identity with ``F.interpolate`` itself, so
they follow its conventions (half-pixel centres, clamped edges) by construction.

CPUs keep ``F.interpolate``, which is fast there and needs no matrices.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def linear_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in): 1-D linear resizing from n_in to n_out samples as ``F.interpolate(mode="linear",
    align_corners=False)`` does it. Cached per shape, device and dtype; made outside inference mode
    so that training may use it too."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, device=device, dtype=torch.float32).unsqueeze(1)  # (n_in, 1, n_in)
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous().to(dtype)


def resize_by_matrices(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resizing of (B, C, H, W) x to `size` as ``rows @ x @ cols.T``, on any device."""
    rows = linear_matrix(x.shape[-2], size[0], x.device, x.dtype)  # (h, H)
    cols = linear_matrix(x.shape[-1], size[1], x.device, x.dtype)  # (w, W)
    return torch.matmul(rows, x @ cols.T)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for (B, C, H, W) x: matrix
    products on CUDA, the library's kernel elsewhere."""
    if x.is_cuda:
        return resize_by_matrices(x, size)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
