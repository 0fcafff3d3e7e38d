"""Patch memory bank fitted from good images only (nearest-neighbour anomaly scoring).

Every patch feature of every good training image is a sample of "normal"; a coreset keeps a
representative subset (greedy k-centre), and a test patch's anomaly is its distance to the
nearest kept patch. Distances are computed as batched matrix products (||a||^2 - 2ab + ||b||^2)
so the same code runs on a GPU at full speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_descriptors(features: list[torch.Tensor]) -> torch.Tensor:
    """Per-patch descriptors from encoder feature maps [(B,C,h,w), ...] -> (B, h*w, D).

    A 3x3 average over neighbours gives each patch a little context (as PatchCore does), and
    each layer is L2-normalised so no layer dominates the distance.
    """
    parts = [F.normalize(F.avg_pool2d(f.float(), 3, 1, 1), dim=1) for f in features]  # float32: nearest_distance
    x = torch.cat(parts, 1)  # (B, D, h, w)
    return x.flatten(2).transpose(1, 2)


def greedy_coreset(x: torch.Tensor, size: int, seed: int = 0, proj_dim: int = 64) -> torch.Tensor:
    """Indices of `size` rows of x (N, D) chosen by greedy k-centre on a random projection.

    Each step adds the row farthest from everything chosen so far; squared distances are
    updated with one matrix-vector product per step (no full distance matrix).
    """
    n = x.shape[0]
    if size >= n:
        return torch.arange(n, device=x.device)
    with torch.autocast(x.device.type, enabled=False):  # float32, as nearest_distance
        return _greedy_coreset(x.float(), size, seed, proj_dim)


def _greedy_coreset(x: torch.Tensor, size: int, seed: int, proj_dim: int) -> torch.Tensor:
    n = x.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.randn(x.shape[1], min(proj_dim, x.shape[1]), generator=g).to(x)
    z = x @ proj  # (N, d)
    chosen = torch.empty(size, dtype=torch.long, device=x.device)
    chosen[0] = int(torch.randint(n, (1,), generator=g))
    z_sq = (z * z).sum(1)  # (N,)
    dist = z_sq - 2 * z @ z[chosen[0]] + z_sq[chosen[0]]  # (N,) squared distance to the chosen set
    for i in range(1, size):
        idx = torch.argmax(dist)
        chosen[i] = idx
        torch.minimum(dist, z_sq - 2 * (z @ z[idx]) + z_sq[idx], out=dist)
    return chosen


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Distance of each query row (M, D) to its nearest bank row (K, D) -> (M,), chunked matmuls.

    Always in float32 with autocast off: the expanded form subtracts numbers near ||q||^2 + ||b||^2
    (2 for these unit-norm layers), and in bf16 every distance under ~0.1 rounds to 0, while a
    from-scratch encoder's good and defective patches lie 0.005-0.02 apart (on real steel, bf16
    autocast had turned the memory-bank source into noise: image AUROC 0.50 against 0.80). TF32
    products and a bf16 ranking refined exactly were measured on an H100 and not kept: TF32 moved a
    trained model's scores by up to 0.51, the bf16 ranking by up to 0.011 for 16 % less time at 8,192
    rows only (bench/RESULTS.md, session 27)."""
    with torch.autocast(queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        bank_sq = (bank * bank).sum(1)  # (K,)
        out = []
        for q in queries.split(chunk):
            d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq  # (m, K)
            out.append(d2.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


class PatchMemoryBank(nn.Module):
    """Holds the coreset as a buffer so it is saved with the model's weights."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, descriptors: torch.Tensor, seed: int = 0) -> None:
        """descriptors: (N, D) patches of good images; keeps at most the buffer's size."""
        size = self.bank.shape[0]
        idx = greedy_coreset(descriptors.float(), size, seed)
        kept = descriptors[idx].float()
        if kept.shape[0] < size:  # fewer patches than slots: repeat so the buffer shape is fixed
            kept = kept[torch.arange(size, device=kept.device) % kept.shape[0]]
        self.bank.copy_(kept)
        self.fitted.fill_(True)

    def forward(self, descriptors: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """descriptors (B, N, D) -> distance maps (B, 1, h, w)."""
        b, n, d = descriptors.shape
        dist = nearest_distance(descriptors.reshape(b * n, d).float(), self.bank.float())
        return dist.view(b, 1, *grid)
