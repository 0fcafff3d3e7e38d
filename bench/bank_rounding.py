"""How much precision the memory bank's nearest-neighbour search needs: a trained model's memory-bank
score on a test split with the distances computed from inputs rounded to fewer mantissa bits (TF32 keeps
10, bf16 7), products accumulated and returned in float32, optionally followed by exact float32
distances to the k best-ranked bank rows; each against the exact search.

    python bench/bank_rounding.py MODEL_DIR DATA_DIR

It emulates on a CPU what a TF32 product, a bf16 product with float32 output (`torch.mm(...,
out_dtype=torch.float32)` on CUDA) or an int8 product with int32 accumulation (`torch._int_mm`) would rank.
(Session 26 built the TF32 and bf16-refine searches into the library; session 27 measured them on an H100,
kept neither and removed them: bench/RESULTS.md.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch

from lineinspect.training.datasets import open_dataset
from lineinspect.training.metrics import image_auroc
from lineinspect.training.recalibrate import score_sources
from lineinspect.vision import memory_bank
from lineinspect.vision.model_io import load_inspector

SETTINGS = ((10, 0), (10, 8), (7, 0), (7, 8), (7, 32))  # (mantissa bits, rows refined exactly; 0: none)


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values rounded to `bits` mantissa bits (round half up on the bit pattern)."""
    drop = 23 - bits
    i = x.float().contiguous().view(torch.int32)
    return (((i + (1 << (drop - 1))) >> drop) << drop).view(torch.float32)


def rounded_search(bits: int, refine: int) -> Callable[..., torch.Tensor]:
    def nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        q, b = queries.float(), bank.float()
        mean = b.mean(0)  # centred first, as a coarse pass would be
        qc, bc = round_mantissa(q - mean, bits), round_mantissa(b - mean, bits)
        rank = (bc * bc).sum(1) - 2 * qc @ bc.T  # (M, K): the squared distance less ||q||^2
        if refine == 0:
            d2 = rank.min(1).values + (qc * qc).sum(1)
        else:
            idx = rank.topk(refine, dim=1, largest=False).indices
            d2 = (b[idx] - q[:, None]).square().sum(-1).min(1).values
        return d2.clamp_min(0).sqrt()
    return nearest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    inspector = load_inspector(args.model, args.device, cuda_graphs=False, precision="fp32")
    test = open_dataset(args.data).test
    paths, labels = [s.path for s in test], np.array([s.is_defect for s in test])
    exact = score_sources(inspector, paths)["memory"]
    figures: dict[str, object] = {"model": args.model, "exact_auroc": round(image_auroc(exact, labels), 4)}
    original = memory_bank.nearest_distance
    try:
        for bits, refine in SETTINGS:
            memory_bank.nearest_distance = rounded_search(bits, refine)
            got = score_sources(inspector, paths)["memory"]
            figures[f"{bits}bit_refine{refine}"] = {"auroc": round(image_auroc(got, labels), 4),
                                                    "max_score_change": round(float(np.abs(got - exact).max()), 5)}
    finally:
        memory_bank.nearest_distance = original
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
