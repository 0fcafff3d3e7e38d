"""The head's two fixed-function hot spots at serving shapes, each way it can be computed, same run.
H100, batch 64 at 224 px (session 16): line filters 2.12 ms direct, 0.85 ms FFT (the GPU path now);
8 nearest of 784: top-k 1.47 ms, sort 1.59 ms (top-k stays).

* the line-filter bank (vision.ridges): one grey channel, eight 15x15 filters, as a direct fp32
  convolution (cuDNN) and as real FFTs (`correlate_fft`, what the GPU path uses);
* the k nearest neighbours of self-similarity (vision.self_similarity): the 8 smallest of each row
  of a (B, N, N) distance matrix, N = (S / 8)^2, by top-k (what the head uses) and by a sort.

    python bench/head_kernels.py [--device cuda] [--batch 64] [--size 224] [--out FILE]

Prints median and p10-p90 ms per call (CUDA events, after warm-up) and one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.vision.ridges import correlate_fft, ridge_kernels


def time_ms(fn, device: torch.device, reps: int = 50) -> dict:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    p10, p50, p90 = np.percentile(times, (10, 50, 90))
    return {"median_ms": round(float(p50), 4), "p10_ms": round(float(p10), 4), "p90_ms": round(float(p90), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    kernels = ridge_kernels().to(device)
    pad = kernels.shape[-1] // 2
    gray = torch.rand(args.batch, 1, args.size + 2 * pad, args.size + 2 * pad, device=device)
    n = (args.size // 8) ** 2
    d2 = torch.rand(args.batch, n, n, device=device)
    rows = {
        "line filters, direct convolution fp32": lambda: F.conv2d(gray, kernels),
        "line filters, FFT fp32": lambda: correlate_fft(gray, kernels),
        f"8 nearest of {n}, top-k": lambda: d2.topk(8, dim=-1, largest=False).values,
        f"8 nearest of {n}, sort": lambda: d2.sort(dim=-1).values[..., :8],
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with torch.inference_mode():
        for label, fn in rows.items():
            row = {"name": label, "batch": args.batch, "size": args.size, "device": name, **time_ms(fn, device)}
            print(f"{label:42s} {row['median_ms']:8.3f} ms  ({row['p10_ms']:.3f}-{row['p90_ms']:.3f})")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
