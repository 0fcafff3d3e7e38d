"""fp32 against bf16 autocast on this CPU: one training step and one batch-1 forward per preset;
then the Inspector's CPU path, bf16 autocast over fp32 weights against the copy with bf16 weights
(``vision.inspector.cpu_bf16_copy``), in alternating calls.

    python bench/cpu_precision.py [--presets tiny s14] [--threads 2] [--only-weights]

Untrained models (speed does not depend on the weights); medians over a few repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import cpu_bf16_copy
from lineinspect.vision.precision import autocast


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def training_step(model: DefectModel, opt: torch.optim.Optimizer, batch: torch.Tensor,
                  dtype: torch.dtype | None) -> None:
    model.train()
    with autocast(torch.device("cpu"), dtype):
        out = model.logits(batch)
        loss = out.mask_logits.float().mean() + out.image_logit.float().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def forward(model: DefectModel, image: torch.Tensor, dtype: torch.dtype | None) -> None:
    model.eval()
    with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
        model(image, use_memory=False)


def weight_copy_row(name: str, calls: int) -> str:
    """One table row: batch-1 forward, autocast over fp32 weights vs the bf16-weight copy, both with the
    explicit attention the Inspector uses on CPUs; p50 and p10-p90 of `calls` alternating calls."""
    model = DefectModel(DefectModelConfig(preset(name), HeadConfig())).eval()
    model.encoder.use_fused_attention(False)
    twin = cpu_bf16_copy(model)
    twin.encoder.use_fused_attention(False)
    one = torch.rand(1, 3, preset(name).img_size, preset(name).img_size)

    def call(m: DefectModel) -> torch.Tensor:
        with torch.inference_mode(), autocast(torch.device("cpu"), torch.bfloat16):
            return m(one, use_memory=False).anomaly_map

    diff = float((call(model) - call(twin)).abs().max())
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(calls):
        for i, m in enumerate((model, twin)):
            t = time.perf_counter()
            call(m)
            times[i].append((time.perf_counter() - t) * 1000)
    (a, a10, a90), (b, b10, b90) = (spread(times[i]) for i in (0, 1))
    return (f"| {name} | {a:.1f} ({a10:.1f}-{a90:.1f}) | {b:.1f} ({b10:.1f}-{b90:.1f}) | {b / a:.2f}x | {diff:.4f} |")


def spread(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=10)
    return statistics.median(values), q[0], q[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "s14"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="training batch")
    ap.add_argument("--calls", type=int, default=40, help="alternating calls per model in the weight-copy table")
    ap.add_argument("--only-weights", action="store_true", help="only the bf16-weight copy table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.only_weights:
        precision_table(args)
    print("\n| preset | b1 forward, autocast over fp32 weights ms (p10-p90) | bf16-weight copy ms | ratio |"
          " max map diff |"
          "\n|---|---|---|---|---|")
    for name in args.presets:
        print(weight_copy_row(name, args.calls), flush=True)


def precision_table(args: argparse.Namespace) -> None:
    print("| preset | measurement | fp32 ms | bf16 ms | ratio |\n|---|---|---|---|---|")
    for name in args.presets:
        size = preset(name).img_size
        model = DefectModel(DefectModelConfig(preset(name), HeadConfig()))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch, one = torch.rand(args.batch, 3, size, size), torch.rand(1, 3, size, size)
        cases = ((f"training step b{args.batch}", partial(training_step, model, opt, batch), 5),
                 ("forward b1", partial(forward, model, one), 15))
        for label, run, repeats in cases:
            fp32 = median_ms(partial(run, None), repeats)
            bf16 = median_ms(partial(run, torch.bfloat16), repeats)
            print(f"| {name} | {label} | {fp32:.1f} | {bf16:.1f} | {fp32 / bf16:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
