"""What a 640x480 camera JPEG costs to decode on this machine, by every route the server could take:
OpenCV at full size and shrunk in the DCT domain (the server's path today), torchvision's libjpeg
decoder, and nvJPEG on the GPU through ``torchvision.io.decode_jpeg(device="cuda")`` alone and in
batches, plus the thread-pool hand-off the server pays around a decode.

    python bench/jpeg_decode.py [--reps 300] [--out FILE.json]

Each row: median, p10-p90 and the ratio against the server's path measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_latency import encode_jpeg, render_frames  # noqa: E402

from lineinspect.images import decode_image  # noqa: E402


def timed(fn: Callable[[], object], reps: int, per: int = 1, sync: bool = False) -> dict[str, float]:
    """Median and p10/p90 of `fn` in ms per image (`per` images a call)."""
    for _ in range(10):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3 / per)
    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return {"p50_ms": round(float(p50), 4), "p10_ms": round(float(p10), 4), "p90_ms": round(float(p90), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    jpegs = [encode_jpeg(f, args.quality) for f in render_frames(8, seed=0)]
    it = iter(range(1 << 60))

    def next_jpeg() -> bytes:
        return jpegs[next(it) % len(jpegs)]

    rows: dict[str, dict[str, float]] = {}
    rows["opencv, shrunk to 320x240 (server today)"] = timed(lambda: decode_image(next_jpeg(), min_side=224), args.reps)
    rows["opencv, full 640x480"] = timed(lambda: decode_image(next_jpeg()), args.reps)
    pool = ThreadPoolExecutor(1)
    rows["thread-pool hand-off, no work"] = timed(lambda: pool.submit(int).result(), args.reps)
    rows["opencv shrunk, through the pool"] = timed(
        lambda: pool.submit(decode_image, next_jpeg(), "image", min_side=224).result(), args.reps)
    try:
        from torchvision.io import decode_jpeg
    except ImportError as exc:
        rows["torchvision decode_jpeg"] = {"error": str(exc)}  # type: ignore[dict-item]
        decode_jpeg = None
    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    if decode_jpeg is not None:
        rows["torchvision decode_jpeg, CPU"] = timed(lambda: decode_jpeg(tensors[next(it) % len(tensors)]), args.reps)
        if torch.cuda.is_available():
            try:
                rows["nvJPEG, one frame (to a CUDA tensor)"] = timed(
                    lambda: decode_jpeg(tensors[next(it) % len(tensors)], device="cuda"), args.reps, sync=True)
                for batch in (8, 32):
                    group = [tensors[i % len(tensors)] for i in range(batch)]
                    rows[f"nvJPEG, batch of {batch}, per frame"] = timed(
                        lambda g=group: decode_jpeg(g, device="cuda"), max(args.reps // 10, 10), per=batch, sync=True)
            except RuntimeError as exc:
                rows["nvJPEG"] = {"error": str(exc).splitlines()[0]}  # type: ignore[dict-item]
    base = rows["opencv, shrunk to 320x240 (server today)"]["p50_ms"]
    for row in rows.values():
        if "p50_ms" in row:
            row["ratio_vs_server"] = round(row["p50_ms"] / base, 3)
    print(f"{'route':48s} {'p50 ms':>8s} {'p10-p90 ms':>16s} {'x server':>9s}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:48s} {row['error']}")
        else:
            spread = f"{row['p10_ms']:7.3f}-{row['p90_ms']:<8.3f}"
            print(f"{name:48s} {row['p50_ms']:8.3f} {spread} {row['ratio_vs_server']:9.2f}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"torch": torch.__version__, "device": device, "jpeg_bytes_mean": int(np.mean([len(j) for j in jpegs])),
              "rows": rows}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
