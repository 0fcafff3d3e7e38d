"""fp32 against bf16 autocast on this CPU: one training step and one batch-1 forward per preset.

    python bench/cpu_precision.py [--presets tiny s14] [--threads 2]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "s14"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="training batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
