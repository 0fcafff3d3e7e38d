"""Patch memory bank fitted from good images only (nearest-neighbour anomaly scoring).

Every patch feature of every good training image is a sample of "normal"; a coreset keeps a
representative subset (greedy k-centre), and a test patch's anomaly is its distance to the
nearest kept patch. Distances are computed as batched matrix products (||a||^2 - 2ab + ||b||^2)
so the same code runs on a GPU at full speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


SEARCHES = ("exact", "tf32", "bf16_refine")


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096, search: str = "exact"
                     ) -> torch.Tensor:
    """Distance of each query row (M, D) to its nearest bank row (K, D) -> (M,), chunked matmuls.

    Always in float32 with autocast off: the expanded form subtracts numbers near ||q||^2 + ||b||^2
    (2 for these unit-norm layers), and in bf16 every distance under ~0.1 rounds to 0, while a
    from-scratch encoder's good and defective patches lie 0.005-0.02 apart (on real steel, bf16
    autocast had turned the memory-bank source into noise: image AUROC 0.50 against 0.80).

    `search` trades exactness for speed on a GPU: "tf32" rounds the product's inputs to TF32's
    10 mantissa bits (float32 accumulation and output); "bf16_refine" ranks the bank with a bf16
    product of the centred rows (float32 output), then measures the 8 best-ranked rows exactly.
    bench/bank_rounding.py bounds what either rounding moves a trained model's scores."""
    if search not in SEARCHES:
        raise ValueError(f"unknown bank search {search!r}; expected one of {SEARCHES}")
    with torch.autocast(queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        if search == "bf16_refine":
            return _refined_distance(queries, bank, chunk)
        bank_sq = (bank * bank).sum(1)  # (K,)
        out = []
        with _tf32_products(search == "tf32"):
            for q in queries.split(chunk):
                d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq  # (m, K)
                out.append(d2.min(1).values.clamp_min(0).sqrt())
    return torch.cat(out)


REFINED_ROWS = 8


def _refined_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    mean = bank.mean(0)
    centred = (bank - mean).bfloat16()
    centred_sq = centred.float().square().sum(1)
    out = []
    for q in queries.split(max(1, chunk // 4)):  # the refine step holds (m, 8, D) floats
        rank = centred_sq - 2.0 * _bf16_product((q - mean).bfloat16(), centred)  # ||q - b||^2 less ||q||^2
        rows = bank[rank.topk(min(REFINED_ROWS, len(bank)), dim=1, largest=False).indices]  # (m, k, D)
        out.append((rows - q[:, None]).square().sum(-1).min(1).values.sqrt())
    return torch.cat(out)


def _bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T of bf16 rows with float32 accumulation and output (CPUs lack the fused kernel)."""
    if a.is_cuda:
        return torch.mm(a, b.T, out_dtype=torch.float32)
    return a.float() @ b.float().T


@contextmanager
def _tf32_products(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class PatchMemoryBank(nn.Module):
    """Holds the coreset as a buffer so it is saved with the model's weights."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.search = "exact"  # see nearest_distance

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
        dist = nearest_distance(descriptors.reshape(b * n, d).float(), self.bank.float(), search=self.search)
        return dist.view(b, 1, *grid)
