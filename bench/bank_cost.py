"""What the memory bank's search adds to a defect model's forward pass: the model with its bank (and the
region statistics fitted with it: the memory, regions and fused sources) against the same model without
them (the head alone), at batch sizes 1 and 64, under the precision the Inspector serves in (bf16
autocast on GPUs and bf16 CPUs). The bank holds random unit rows: its cost depends on its shape, not
its content.

    python bench/bank_cost.py --preset l14 --device cuda [--bank 8192 4096] [--batches 1 64]
    python bench/bank_cost.py --preset s14 --img-size 168 --device cpu --batches 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.precision import autocast, autocast_dtype


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="s14")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bank", type=int, nargs="+", default=[2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    encoder = preset(args.preset, **({"img_size": args.img_size} if args.img_size else {}))
    dtype = autocast_dtype(device)
    rows = []
    for bank in args.bank:
        model = DefectModel(DefectModelConfig(encoder, HeadConfig(), memory_bank_size=bank)).to(device).eval()
        model.memory.fit(F.normalize(torch.randn(bank, model.memory.bank.shape[1], device=device), dim=1))
        model.regions.fit(torch.rand(64, 3, encoder.img_size, encoder.img_size, device=device))
        for batch in args.batches:
            x = torch.rand(batch, 3, encoder.img_size, encoder.img_size, device=device)
            figures = {}
            for name, use_memory in (("head", False), ("with_bank", True)):
                run = partial(model, x, use_memory=use_memory, bank_fitted=True)
                with torch.no_grad(), autocast(device, dtype):
                    timed(run, device, 3)
                    ms = sorted(timed(run, device, args.repeats))
                figures[name] = {"median_ms": round(statistics.median(ms), 3),
                                 "p10_ms": round(ms[len(ms) // 10], 3), "p90_ms": round(ms[9 * len(ms) // 10], 3)}
            row = {"preset": args.preset, "img_size": encoder.img_size, "device": str(device), "dtype": str(dtype),
                   "bank": bank, "batch": batch, **figures,
                   "ratio": round(figures["with_bank"]["median_ms"] / figures["head"]["median_ms"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
