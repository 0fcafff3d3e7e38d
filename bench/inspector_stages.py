"""Where an Inspector batch call spends its time, stage by stage, on 640x480 camera frames.

For each batch size: the upload and resize into the graph's input (`frames_into`), the graph
replay alone, the runner's whole call (upload, replay, one copy of the rows to the host), and
`inspect_batch` (that plus verdicts and boxes on the host); medians over repeated calls, each
synchronised. Then the GPU kernels of one runner call at the smallest and the largest batch (torch.profiler).

    python bench/inspector_stages.py --preset l14 --device cuda --batches 1 16 64 --out stages.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from serve_latency import render_frames  # bench/, the script's directory, is on sys.path

from lineinspect.vision.cuda_graphs import bucket_for
from lineinspect.vision.inspector import Inspector
from lineinspect.vision.model_io import untrained_inspector
from lineinspect.vision.preprocess import frames_into


def timed(fn: Callable[[], object], device: torch.device, calls: int) -> dict:
    samples = []
    for _ in range(calls + 2):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1000)
    a = np.asarray(samples[2:])
    return {"p50_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)), "p90_ms": float(np.percentile(a, 90))}


def kernels(fn: Callable[[], object], top: int = 12) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    busy: dict[str, float] = {}
    count = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            busy[e.name[:90]] = busy.get(e.name[:90], 0.0) + e.time_range.elapsed_us()
            count += 1
    return {"gpu_ops": count, "gpu_busy_us": sum(busy.values()),
            "top_us": dict(sorted(((k, round(v, 1)) for k, v in busy.items()), key=lambda kv: -kv[1])[:top])}


def stage_times(inspector: Inspector, batch: list[np.ndarray], bucket: Any, device: torch.device, calls: int) -> dict:
    runner = inspector.graphs
    return {
        "upload_resize": timed(lambda: frames_into(batch, bucket.images), device, calls),
        "replay": timed(bucket.graph.replay, device, calls),
        "runner_run": timed(lambda: runner.run(batch), device, calls),
        "inspect_batch": timed(lambda: inspector.inspect_batch(batch), device, calls),
    }


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="l14")
    ap.add_argument("--classes", type=int, default=0, metavar="K", help="defect kinds the head names (7: a named line)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    inspector = untrained_inspector(args.preset, args.device, num_classes=args.classes)
    runner = inspector.graphs
    if runner is None:
        raise SystemExit("inspector_stages.py measures the CUDA-graph path: run it with --device cuda on a GPU")
    frames = render_frames(16, 0)
    results: dict = {"preset": args.preset, "classes": args.classes, "cal": inspector.calibration.to_dict()}
    for b in args.batches:
        batch = [frames[i % len(frames)] for i in range(b)]
        bucket = runner._buckets[bucket_for(b, runner.buckets)]
        row = stage_times(inspector, batch, bucket, device, args.calls)
        row["inspect_fps"] = b * 1000 / row["inspect_batch"]["p50_ms"]
        results[f"b{b}"] = row
        print(b, {k: (round(v["p50_ms"], 2) if isinstance(v, dict) else round(v)) for k, v in row.items()}, flush=True)
    for b in sorted({min(args.batches), max(args.batches)}):  # the GPU work of one runner call
        batch = [frames[i % len(frames)] for i in range(b)]
        results[f"kernels_runner_run_b{b}"] = kernels(lambda batch=batch: runner.run(batch))
        print(b, json.dumps(results[f"kernels_runner_run_b{b}"], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
