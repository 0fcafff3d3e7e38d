"""The fused gate-up kernel (moe_lm.fused_gemm) against today's gate-up stage, and the MoE layer with it.

    python bench/moe_fused_gemm.py [--out FILE] [--tokens 64 4096] [--configs NAME ...]

CUDA only (about a minute on an H100, Triton compiles included). The layer is bench/gpu.py's
section 4 (the l14 preset's MoE layer in bf16, eval mode, random routing). At each token count the
experts' inputs of one forward pass are kept as the layer passes them (token rows, the expert
order's index, the groups' ends, router weights) and the gate-up stage is timed on them:
 (a) today's: gather the rows into expert order, one torch._grouped_mm to (M, 2H), fused.silu_mul;
 (b) the fused kernel for each tile config, after checking it against (a) (max abs error over max abs).
Then the whole layer's forward with the fused GEMM off and on (the config fastest in (b)), with
the dense SwiGLU of the same active FLOPs; at token counts that run every expert (decoding sizes)
the layer is also timed with the sorted dispatch forced, where the kernel runs. Every time is of
CUDA-graph replays, each timed with CUDA events: median and p10/p90/p99 of at least 50 (bench/gpu.py).
One JSON line per measurement goes to stdout and to --out; a table of them follows at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from gpu import FULL, MoELayers, Recorder, environment, forward_only, kernel_entry, moe_layers, table_row

from lineinspect.moe_lm.fused import silu_mul, triton
from lineinspect.moe_lm.fused_gemm import CONFIGS, _gate_up_silu_triton, set_fused_gemm
from lineinspect.moe_lm.moe import DENSE_DISPATCH_ROWS, MoEBlock

PLAN = dataclasses.replace(FULL, iters=100)  # replays timed per measurement (at least 50 within its budget)
MAX_REL_ERR = 2e-2  # bf16 products rounded once (today's) against not at all (fused): ~1e-2 at most


class JsonLines(Recorder):
    """bench/gpu.py's recorder, printing each measurement as its JSON line and all as a table at the end."""

    HEADER = ""

    def __init__(self, path: Path, device: torch.device) -> None:
        super().__init__(path, device)
        self.entries: list[dict] = []

    def write(self, entry: dict) -> None:
        line = json.dumps({"run": self.run, **entry})
        self.file.write(line + "\n")
        self.file.flush()
        print(line, flush=True)
        self.entries.append(entry)

    def table(self) -> None:
        print("\n" + Recorder.HEADER)
        for entry in self.entries:
            print(table_row(entry))


@dataclasses.dataclass(frozen=True)
class Stage:
    """The gate-up stage's inputs, as MoEBlock passes them to RoutedExperts."""

    x: torch.Tensor  # (T, C) token rows
    index: torch.Tensor  # (M,) the token of each row in expert order
    offs: torch.Tensor  # (E,) int32 end row of each expert's group
    scale: torch.Tensor  # (M,) router weights
    w: torch.Tensor  # (E, C, 2H) gate then up


def stage_inputs(block: MoEBlock, x: torch.Tensor) -> Stage:
    """The experts' inputs of one forward pass of block on x (B, T, C), by the sorted dispatch."""
    seen: dict = {}
    hook = block.experts.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                                   with_kwargs=True)
    rows, block.dense_dispatch_rows = block.dense_dispatch_rows, 0
    try:
        with torch.no_grad():
            block(x)
    finally:
        hook.remove()
        block.dense_dispatch_rows = rows
    flat, offs, scale = seen["args"]
    return Stage(flat, seen["kwargs"]["index"], offs, scale, block.experts.w_gate_up.detach())


def unfused(s: Stage) -> torch.Tensor:
    """Today's gate-up stage: the row gather, one grouped GEMM, the Triton activation."""
    gate, up = torch._grouped_mm(s.x.index_select(0, s.index), s.w, offs=s.offs).chunk(2, dim=-1)
    return silu_mul(gate, up, s.scale)


def fused(s: Stage, config: str) -> torch.Tensor:
    """The fused kernel itself (not the layer's policy, which leaves small eager calls to PyTorch)."""
    return _gate_up_silu_triton(s.x, s.index, s.offs, s.w, s.scale, CONFIGS[config])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def time_stage(rec: JsonLines, name: str, fn: Callable[[], torch.Tensor], s: Stage, flops: float,
               want: torch.Tensor | None = None) -> dict | None:
    """Check fn against `want` (if given), then time its graph replays; the entry, or None."""
    note = f"M={s.index.shape[0]} rows, {int((s.offs.diff(prepend=s.offs[:1] * 0) == 0).sum())} empty experts"
    if want is not None:
        with torch.no_grad():
            err = rel_err(fn(), want)
        if not err <= MAX_REL_ERR:
            rec.write({"name": name, "error": f"max abs error {err:.3g} of the max abs output, over {MAX_REL_ERR}"})
            return None
        note += f"; max abs err / max abs {err:.2e} against today's"
    # forward_entry times fn(x) per token of x (1, T, C); the stage reads its static inputs itself
    return rec.measure(name, forward_only, lambda _: fn(), s.x[None], rec.device, PLAN, flops, graph=True, note=note)


def stage_section(rec: JsonLines, block: MoEBlock, tokens: int, configs: list[str]) -> str | None:
    """(a) and (b) at `tokens` tokens; the fastest config that passed its check, if any."""
    x = torch.randn(1, tokens, block.experts.width, device=rec.device, dtype=torch.bfloat16)
    s = stage_inputs(block, x)
    flops = 2 * block.top_k * block.experts.width * 2 * block.experts.hidden  # per token
    with torch.no_grad():
        want = unfused(s)
    time_stage(rec, f"gate-up stage {tokens} tok, today (gather + grouped_mm + silu_mul)", lambda: unfused(s), s, flops)
    medians = {}
    for config in configs:
        entry = time_stage(rec, f"gate-up stage {tokens} tok, fused {config}", lambda c=config: fused(s, c), s, flops,
                           want)
        if entry:
            medians[config] = entry["median_ms"]
    return min(medians, key=medians.get) if medians else None


def layer_section(rec: JsonLines, layers: MoELayers, tokens: int, config: str | None, profile: bool) -> None:
    """The MoE layer's forward with the fused GEMM off and on (`config`), against the dense SwiGLU."""
    block = layers.block
    x = torch.randn(1, tokens, layers.cfg.width, device=rec.device, dtype=torch.bfloat16)

    def moe(t: torch.Tensor) -> torch.Tensor:
        return block(t)[0]

    dense = rec.measure(f"dense SwiGLU {tokens} tok fwd, CUDA graph", forward_only, layers.dense, x, rec.device, PLAN,
                        layers.flops, graph=True)
    dispatches = [(DENSE_DISPATCH_ROWS, "")]
    if tokens * block.n_experts <= DENSE_DISPATCH_ROWS:  # decoding sizes run every expert: the sorted dispatch too
        dispatches.append((0, ", always sorted dispatch"))
    for rows, dispatch in dispatches:
        block.dense_dispatch_rows = rows
        for on in (False, True) if config else (False,):
            set_fused_gemm(block, on, config)
            label = f"fused GEMM {config}" if on else "fused GEMM off"
            entry = rec.measure(f"MoE layer {tokens} tok fwd, CUDA graph, {label}{dispatch}", forward_only, moe, x,
                                rec.device, PLAN, layers.flops, graph=True)
            if entry and dense:
                ratio = entry["median_ms"] / dense["median_ms"]
                rec.write({"name": f"MoE / dense SwiGLU {tokens} tok fwd, {label}{dispatch}", "ratio": ratio,
                           "note": f"{ratio:.2f}x ({entry['median_ms']:.3f} / {dense['median_ms']:.3f} ms)"})
            if profile and not dispatch:
                rec.measure(f"MoE layer {tokens} tok fwd, GPU kernels, {label}", kernel_entry, moe, x)
    block.dense_dispatch_rows = DENSE_DISPATCH_ROWS
    set_fused_gemm(block, False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "moe_fused_gemm.jsonl",
                        help="JSON-lines file, appended to")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(FULL.moe_tokens))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"tile configs of the fused kernel (default all: {', '.join(CONFIGS)})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        sys.exit("bench/moe_fused_gemm.py needs a CUDA GPU and Triton; " +
                 ("Triton is not installed" if triton is None else "no CUDA device is visible"))
    device = torch.device("cuda", torch.cuda.current_device())
    rec = JsonLines(args.out, device)
    rec.write({**environment(device, quick=False), "triton": triton.__version__})
    layers = moe_layers(PLAN, device)
    best = {tokens: rec.attempt(f"gate-up stage {tokens} tok", stage_section, rec, layers.block, tokens, args.configs)
            for tokens in args.tokens}
    for tokens in args.tokens:
        rec.attempt(f"MoE layer {tokens} tok", layer_section, rec, layers, tokens, best[tokens],
                    tokens == max(args.tokens))
    rec.table()


if __name__ == "__main__":
    main()
