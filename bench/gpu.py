"""Every GPU measurement in one run (a few minutes on one H200), streamed to a JSON-lines file.

    python bench/gpu.py [--out FILE]               # H200: ViT-L/14 and the l14 decoder
    python bench/gpu.py --only-inspector           # section 2 alone (about a minute)
    python bench/gpu.py --only-moe                 # section 4 alone (well under a minute)
    python bench/gpu.py --device cpu --quick       # smoke run on a CPU, tiny sizes, under 2 minutes

In order (cheapest and most important first):
 1. ViT encoder alone: fp32 and bf16 eager, bf16 under a CUDA graph, batch 1 and a large batch; the
    whole DefectModel (encoder + head + heatmap) under a CUDA graph, and with the memory bank.
 2. The served fast path end to end: `Inspector.inspect_batch` on 640x480 RGB frames (resize, model,
    scores, boxes) from the Inspector's CUDA graphs (lineinspect.vision.cuda_graphs) against its
    eager path (the baseline, in the same run), their start-up capture time, and how far apart
    their scores and heatmaps are.
 3. fp8 (e4m3) linear layers (lineinspect.vision.fp8) against bf16: each ViT linear alone, the whole
    encoder, and the fp8 encoder's patch tokens against the bf16 ones.
 4. One MoE feed-forward layer: grouped_mm, padded_bmm, the per-expert Python loop, and a dense
    SwiGLU with the same active FLOPs; forward, and forward + backward; grouped_mm and the dense
    SwiGLU forward also replayed from CUDA graphs, and their ratio.
 5. Report generation with the KV cache (greedy), cross-attending to the encoder's patch tokens
    through the fusion path (evidence tokens -> resampler -> gated cross-attention).

Each measurement appends one JSON object to --out and flushes it, so a killed run keeps what it
finished; one that fails records its error and the run goes on. Times: median, p10, p90 and p99
over repeated calls after warm-up; each call is synchronised and timed with CUDA events on GPUs,
perf_counter on CPUs. Models carry random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.config import preset as decoder_preset
from lineinspect.moe_lm.experts import RoutedExperts, SwiGLU
from lineinspect.moe_lm.fused import set_fused_kernels
from lineinspect.moe_lm.generate import SamplingConfig, generate
from lineinspect.moe_lm.moe import DENSE_DISPATCH_ROWS, MoEBlock
from lineinspect.moe_lm.report_model import EvidenceConfig, ReportModel, evidence_tokens, language_config
from lineinspect.training.defects import DEFECT_TYPES, render_defect
from lineinspect.training.surfaces import SURFACES, make_surface
from lineinspect.vision.cuda_graphs import capture_graph
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset as encoder_preset
from lineinspect.vision.fp8 import Fp8Linear, convert_linears_to_fp8, quantize
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration, Inspector

T = TypeVar("T")
BF16 = torch.bfloat16
Fn = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Plan:
    """The sizes and repetitions of one run."""

    encoder: str  # lineinspect.vision.encoder preset
    decoder: str  # lineinspect.moe_lm.config preset; also sizes the single MoE layer
    big_batch: int  # images per batch for throughput
    inspector_batches: tuple[int, ...]  # frames per Inspector.inspect_batch call
    moe_tokens: tuple[int, ...]
    gen_batches: tuple[int, ...]
    new_tokens: int
    prompt_len: int
    memory_bank: int  # patches in the DefectModel's memory bank
    classes: int  # defect kinds the head names (0: none; a named synthetic line has 7, so its crop namer runs)
    warmup: int
    iters: int  # timed calls at most ...
    budget_s: float  # ... and at least 3, stopping once this many seconds are spent


FULL = Plan("l14", "l14", 64, (1, 32, 64), (64, 4096), (1, 32), 64, 16, 2048, 0, warmup=5, iters=50, budget_s=3.0)
QUICK = Plan("tiny", "tiny", 8, (1, 8), (64, 256), (1, 4), 8, 8, 128, 0, warmup=1, iters=5, budget_s=0.3)


# --------------------------------------------------------------------------- recording


class Recorder:
    """Appends one JSON line per measurement (flushed at once) and prints it as a markdown table row."""

    HEADER = ("| measurement | median ms | p10 | p90 | p99 | throughput | TFLOP/s | notes |\n"
              "|---|---|---|---|---|---|---|---|")

    def __init__(self, path: Path, device: torch.device) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.device = device
        self.run = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(self.HEADER, flush=True)

    def write(self, entry: dict) -> None:
        self.file.write(json.dumps({"run": self.run, **entry}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        print(table_row(entry), flush=True)

    def attempt(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """fn(*args, **kwargs), or None after recording its error under `name`."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # one failure must not end the run
            self.write({"name": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
            return None

    def measure(self, name: str, fn: Callable[..., dict], *args: Any, note: str = "", **kwargs: Any) -> dict | None:
        """One measurement: fn(*args, **kwargs) returns its fields; write them (or the error) at once."""
        def run() -> dict:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            entry = {"name": name, **fn(*args, **kwargs)}
            if note:
                entry["note"] = "; ".join(filter(None, (entry.get("note"), note)))
            if self.device.type == "cuda":
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            self.write(entry)
            return entry

        return self.attempt(name, run)

    def skip(self, name: str, why: str) -> None:
        self.write({"name": name, "skipped": why})


def table_row(entry: dict) -> str:
    def num(key: str, fmt: str = "{:.3g}") -> str:
        return fmt.format(entry[key]) if entry.get(key) is not None else ""

    rate = ""
    if entry.get("rate"):
        rate = f"{entry['rate']:{'.0f' if entry['rate'] >= 100 else '.3g'}} {entry['rate_unit']}"
    note = entry.get("note", "")
    if "error" in entry:
        note = f"ERROR {entry['error'][:200]}"
    elif "skipped" in entry:
        note = f"skipped: {entry['skipped']}"
    cells = [entry["name"], num("median_ms"), num("p10_ms"), num("p90_ms"), num("p99_ms"), rate,
             num("tflops"), note.replace("|", "/").replace("\n", " ")]
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds for one call of fn, from an idle device to its last kernel."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(fn: Callable[[], Any], device: torch.device, plan: Plan, iters: int | None = None,
            budget_s: float | None = None, warmup: int | None = None) -> dict:
    """Warm up, then time repeated calls: median and p10/p90/p99 in ms, and the number of calls."""
    for _ in range(plan.warmup if warmup is None else warmup):
        time_call(fn, device)
    iters, budget_s = iters or plan.iters, budget_s or plan.budget_s
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < iters and (len(times) < 3 or time.perf_counter() < deadline):
        times.append(time_call(fn, device))
    p10, p50, p90, p99 = np.percentile(times, [10, 50, 90, 99])
    return {"median_ms": p50, "p10_ms": p10, "p90_ms": p90, "p99_ms": p99, "n": len(times)}


def first_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def forward_entry(fn: Fn, x: torch.Tensor, device: torch.device, plan: Plan, flops_per_item: float | None,
                  graph: bool = False, per: str = "img") -> dict:
    """Time fn(x), eagerly or replayed from a CUDA graph: throughput per image (or token: per="tok")
    and achieved TFLOP/s. A graph's output is checked against an eager call."""
    extra = {}
    call: Callable[[], Any] = lambda: fn(x)  # noqa: E731
    if graph:
        cuda_graph, static_out = capture_graph(call, device)
        cuda_graph.replay()
        diff = first_tensor(static_out).float() - first_tensor(fn(x)).float()
        extra["graph_vs_eager_max_abs"] = float(diff.abs().max())
        call = cuda_graph.replay
    stats = measure(call, device, plan)
    seconds = stats["median_ms"] / 1e3
    items = x.shape[0] if per == "img" else x.shape[0] * x.shape[1]
    tflops = flops_per_item * items / seconds / 1e12 if flops_per_item else None
    return {**stats, "batch": items, "rate": items / seconds, "rate_unit": f"{per}/s", "tflops": tflops, **extra}


def flop_entry(fn: Fn, x: torch.Tensor) -> dict:
    """FLOPs of fn(x) per image: matmuls, convolutions and (on GPUs) attention, by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn(x)
    flops = counter.get_total_flops() / x.shape[0]
    return {"flops": flops, "note": f"{flops / 1e9:.2f} GFLOP per image (FlopCounterMode)"}


def count_flops(rec: Recorder, name: str, fn: Fn, x: torch.Tensor) -> float | None:
    """Record the FLOPs per image of fn(x) under `name` and return them (None if counting failed)."""
    entry = rec.measure(name, flop_entry, fn, x)
    return entry["flops"] if entry else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- 1. ViT encoder and DefectModel


def build_defect_model(plan: Plan, device: torch.device) -> DefectModel:
    """A randomly initialised DefectModel (fp32), created directly on the device."""
    config = DefectModelConfig(encoder_preset(plan.encoder), HeadConfig(num_classes=plan.classes),
                               memory_bank_size=plan.memory_bank)
    torch.manual_seed(0)
    with device:
        return DefectModel(config).eval()


def graph_or_skip(rec: Recorder, name: str, device: torch.device, *args: Any) -> None:
    """forward_entry(*args, graph=True) under `name` on CUDA; a "needs CUDA" entry elsewhere."""
    if device.type == "cuda":
        rec.measure(name, forward_entry, *args, graph=True)
    else:
        rec.skip(name, "needs CUDA")


def vision_section(rec: Recorder, plan: Plan, device: torch.device, model: DefectModel) -> float | None:
    """Encoder alone (fp32, bf16, graphs), then the whole DefectModel. Leaves `model` in bf16 and
    returns the encoder's FLOPs per image (None if counting failed)."""
    enc, big = model.config.encoder, plan.big_batch
    tag = f"{enc.preset} {enc.img_size}px"
    images = {b: torch.rand(b, 3, enc.img_size, enc.img_size, device=device) for b in (1, big)}
    encoder = model.encoder
    flops = count_flops(rec, f"FLOPs encoder {tag}", encoder, images[1])

    def encoder_autocast(x: torch.Tensor) -> Any:
        with torch.autocast(device.type, dtype=BF16):
            return encoder(x)

    rec.measure(f"encoder {tag} fp32 eager b1", forward_entry, encoder, images[1], device, plan, flops,
                note="TF32 off (torch default)")
    rec.measure(f"encoder {tag} bf16 autocast eager b1", forward_entry, encoder_autocast, images[1], device, plan,
                flops, note="fp32 weights, as the Inspector's eager path runs")
    model.to(BF16)
    images = {b: x.to(BF16) for b, x in images.items()}
    for b in (1, big):
        rec.measure(f"encoder {tag} bf16 eager b{b}", forward_entry, encoder, images[b], device, plan, flops,
                    note="bf16 weights")
        graph_or_skip(rec, f"encoder {tag} bf16 CUDA graph b{b}", device, encoder, images[b], device, plan, flops)

    def full(x: torch.Tensor) -> Any:
        return model(x, use_memory=False)

    def with_memory(x: torch.Tensor) -> Any:
        return model(x, use_memory=True)

    full_flops = count_flops(rec, f"FLOPs DefectModel {tag}", full, images[1])
    for b in (1, big):
        rec.measure(f"DefectModel {tag} bf16 eager b{b}", forward_entry, full, images[b], device, plan, full_flops)
        graph_or_skip(rec, f"DefectModel {tag} bf16 CUDA graph b{b}", device, full, images[b], device, plan,
                      full_flops)
        model.overlap_pixel_branch = False  # A/B: the head's pixel branch after the encoder, on one stream
        graph_or_skip(rec, f"DefectModel {tag} bf16 CUDA graph b{b}, pixel branch on the main stream", device,
                      full, images[b], device, plan, full_flops)
        model.overlap_pixel_branch = True
    descriptors, _ = model.descriptors(images[big])
    rec.attempt("fit memory bank", model.memory.fit, descriptors.flatten(0, 1))
    rec.attempt("fit region statistics", model.regions.fit, images[big].float())
    if not bool(model.memory.fitted):
        return flops
    memory_flops = count_flops(rec, f"FLOPs DefectModel + memory bank + regions {tag}", with_memory, images[1])
    for b in (1, big):
        rec.measure(f"DefectModel + memory bank ({plan.memory_bank}) + regions {tag} bf16 eager b{b}", forward_entry,
                    with_memory, images[b], device, plan, memory_flops,
                    note="eager only: forward reads memory.fitted on the host, which a CUDA graph cannot")
    return flops


# --------------------------------------------------------------------------- 2. Inspector end to end


def camera_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` RGB uint8 640x480 frames: the synthetic surfaces in turn, every other one with a
    defect painted in (as bench/serve_latency.py renders them)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        image = make_surface(SURFACES[i % len(SURFACES)], 640, rng)
        if i % 2:
            image, _ = render_defect(image, DEFECT_TYPES[i % len(DEFECT_TYPES)], rng)
        frames.append(np.ascontiguousarray(image[80:560]))  # the middle 480 rows: 640x480
    return frames


def inspector_entry(inspector: Inspector, frames: list[np.ndarray], plan: Plan) -> dict:
    """inspect_batch(frames) end to end, on the host clock (the call ends with its own synchronisation)."""
    stats = measure(lambda: inspector.inspect_batch(frames), torch.device("cpu"), plan)
    timings = inspector.inspect_batch(frames)[0].timings_ms  # per image: the batch's time / batch size
    n = len(frames)
    model_ms, post_ms = timings["model"] * n, timings["post"] * n
    return {**stats, "batch": n, "rate": n / stats["median_ms"] * 1e3, "rate_unit": "img/s",
            "model_ms": model_ms, "post_ms": post_ms,
            "note": f"one more call: model {model_ms:.2f} ms (resize, model, copy to host), "
                    f"post {post_ms:.2f} ms (verdicts, boxes on the host)"}


def agreement_entry(graphs: Inspector, eager: Inspector, frames: list[np.ndarray]) -> dict:
    """How far the graphs' scores and heatmaps are from the eager path's on the same frames."""
    a, b = graphs.inspect_batch(frames, heatmaps=True), eager.inspect_batch(frames, heatmaps=True)
    score = max(abs(x.score - y.score) for x, y in zip(a, b))
    heatmap = max(float(np.abs(x.heatmap - y.heatmap).max()) for x, y in zip(a, b))
    verdicts = sum(x.is_defect == y.is_defect for x, y in zip(a, b)) / len(frames)
    return {"score_max_abs": score, "heatmap_max_abs": heatmap, "verdicts_agree": verdicts,
            "note": f"{len(frames)} frames: score max abs diff {score:.4f}, heatmap {heatmap:.4f}, "
                    f"verdicts agree {verdicts:.0%} (random weights, threshold 0.5; GPU resize vs OpenCV, "
                    f"bf16 weights vs bf16 autocast)"}


def inspector_section(rec: Recorder, plan: Plan, device: torch.device) -> None:
    """The Inspector with CUDA graphs against the same Inspector eager, on one fp32 model of the
    encoder preset (random weights, default calibration)."""
    model = build_defect_model(plan, device)
    tag = f"{plan.encoder} {model.config.encoder.img_size}px, 640x480 RGB"
    if plan.classes:
        tag += f", naming {plan.classes} kinds"
    frames = camera_frames(8)
    cal = Calibration(class_names=tuple(f"kind_{i}" for i in range(plan.classes)))
    eager = Inspector(model, cal, device, cuda_graphs=False)
    graphs = None
    if device.type == "cuda":
        started = time.perf_counter()
        graphs = rec.attempt(f"Inspector {tag} CUDA graph capture", Inspector, model, cal, device)
        if graphs is not None:
            seconds = time.perf_counter() - started
            rec.write({"name": f"Inspector {tag} CUDA graph capture", "capture_s": seconds,
                       "note": f"{seconds:.1f} s at construction for buckets {list(graphs.graphs.buckets)}"})
    for b in plan.inspector_batches:
        batch = [frames[i % len(frames)] for i in range(b)]
        rec.measure(f"Inspector {tag} eager b{b}", inspector_entry, eager, batch, plan,
                    note="bf16 autocast over fp32 weights, OpenCV resize: the served path before CUDA graphs")
        name = f"Inspector {tag} CUDA graphs b{b}"
        if graphs is not None:
            rec.measure(name, inspector_entry, graphs, batch, plan, note="bf16 weights, resize on the GPU")
        else:
            rec.skip(name, "needs CUDA" if device.type != "cuda" else "capture failed")
    if graphs is not None:
        rec.measure(f"Inspector {tag} CUDA graphs vs eager", agreement_entry, graphs, eager, frames)


# --------------------------------------------------------------------------- 3. fp8 linears


def fp8_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return f"needs compute capability >= 9.0, got {torch.cuda.get_device_capability(device)}"
    return None


def linear_entry(linear: nn.Linear, tokens: int, device: torch.device, plan: Plan) -> dict:
    """One ViT linear at `tokens` rows: fp8 including activation quantisation, fp8 GEMM alone, bf16."""
    x = torch.randn(tokens, linear.in_features, device=device, dtype=BF16)
    fp8 = Fp8Linear(linear)
    xq, x_scale = quantize(x)

    def gemm() -> torch.Tensor:
        return torch._scaled_mm(xq, fp8.weight_fp8.t(), scale_a=x_scale, scale_b=fp8.weight_scale,
                                bias=linear.bias, out_dtype=BF16)

    flops = 2 * tokens * linear.in_features * linear.out_features
    bf16_ms = measure(lambda: linear(x), device, plan)["median_ms"]
    gemm_ms = measure(gemm, device, plan)["median_ms"]
    stats = measure(lambda: fp8(x), device, plan)
    return {**stats, "tflops": flops / stats["median_ms"] / 1e9, "bf16_ms": bf16_ms, "fp8_gemm_only_ms": gemm_ms,
            "note": f"bf16 {bf16_ms:.3f} ms ({flops / bf16_ms / 1e9:.0f} TFLOP/s); fp8 GEMM alone {gemm_ms:.3f} ms "
                    f"({flops / gemm_ms / 1e9:.0f} TFLOP/s); the rest is activation quantisation"}


def fp8_accuracy(bf16_encoder: nn.Module, fp8_encoder: nn.Module, images: torch.Tensor) -> dict:
    """How far the fp8 encoder's patch tokens are from the bf16 encoder's."""
    ref, out = bf16_encoder(images).patches.float(), fp8_encoder(images).patches.float()
    diff = (out - ref).abs()
    result = {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / ref.abs().max()),  # relative to the largest reference value
        "rel_l2": float((out - ref).norm() / ref.norm()),
        "min_cosine": float(F.cosine_similarity(out, ref, dim=-1).min()),
    }
    note = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
    return {**result, "note": f"{note} ({images.shape[0]} images, random weights)"}


def fp8_section(rec: Recorder, plan: Plan, device: torch.device, model: DefectModel, flops: float | None) -> None:
    """fp8 against bf16 at the large batch; `model` is the bf16 DefectModel from section 1, `flops`
    the encoder's FLOPs per image."""
    enc, big = model.config.encoder, plan.big_batch
    tag = f"{enc.preset} {enc.img_size}px"
    block = model.encoder.vit.blocks[0]
    tokens = big * (enc.grid**2 + 1)
    linears = {f"fp8 linear {name} {tokens}x{m.in_features}->{m.out_features}": m for name, m in
               (("qkv", block.attn.qkv), ("proj", block.attn.proj), ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2))}
    eager, graph = f"encoder {tag} fp8 eager b{big}", f"encoder {tag} fp8 CUDA graph b{big}"
    accuracy = f"fp8 vs bf16 encoder patch tokens {tag}"
    why = fp8_skip_reason(device)
    if why is not None:
        for name in [*linears, eager, graph, accuracy]:
            rec.skip(name, why)
        return
    for name, linear in linears.items():
        rec.measure(name, linear_entry, linear, tokens, device, plan)
    fp8_encoder = copy.deepcopy(model.encoder)
    if rec.attempt("convert encoder to fp8", convert_linears_to_fp8, fp8_encoder) is None:
        return
    images = model.normalize(torch.rand(big, 3, enc.img_size, enc.img_size, device=device, dtype=BF16))
    rec.measure(eager, forward_entry, fp8_encoder, images, device, plan, flops)
    rec.measure(graph, forward_entry, fp8_encoder, images, device, plan, flops, graph=True)
    rec.measure(accuracy, fp8_accuracy, model.encoder, fp8_encoder, images[:8])


# --------------------------------------------------------------------------- 4. MoE feed-forward layer


def per_expert_loop(experts: RoutedExperts, x: torch.Tensor, offs: torch.Tensor,
                    scale: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """RoutedExperts.forward as a plain Python loop over experts: the naive baseline."""
    if index is not None:
        x = x.index_select(0, index)
    outputs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        gate, up = (x[start:end] @ experts.w_gate_up[e]).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up) @ experts.w_down[e])
        start = end
    y = torch.cat(outputs)
    return y if scale is None else y * scale[:, None].to(y.dtype)


def use_experts(experts: RoutedExperts, impl: str) -> None:
    """Make the experts run `impl`: "grouped_mm", "padded_bmm" or "loop" (per_expert_loop)."""
    experts.__dict__.pop("forward", None)  # undo an earlier "loop"
    if impl == "loop":
        experts.forward = functools.partial(per_expert_loop, experts)
    else:
        experts.impl = impl


def forward_only(fn: Fn, x: torch.Tensor, device: torch.device, plan: Plan, flops: float,
                 graph: bool = False) -> dict:
    with torch.no_grad():
        return forward_entry(fn, x, device, plan, flops, graph=graph, per="tok")


def forward_backward(module: nn.Module, fn: Fn, x: torch.Tensor, device: torch.device, plan: Plan,
                     flops: float) -> dict:
    """Forward and backward (input and weight gradients) of fn on x; backward counted as 2x forward FLOPs."""
    grad = torch.randn_like(x)

    def step(t: torch.Tensor) -> None:
        module.zero_grad(set_to_none=True)
        fn(t.detach().requires_grad_()).backward(grad)

    was_training = module.training
    module.train()  # training: the sorted dispatch with capacity, as a training step runs it
    try:
        return forward_entry(step, x, device, plan, 3 * flops, per="tok")
    finally:
        module.train(was_training)


def cuda_measure(rec: Recorder, name: str, device: torch.device, fn: Callable[..., dict], *args: Any,
                 **kwargs: Any) -> dict | None:
    """rec.measure(name, fn, *args, **kwargs) on CUDA; a "needs CUDA" entry elsewhere."""
    if device.type != "cuda":
        rec.skip(name, "needs CUDA")
        return None
    return rec.measure(name, fn, *args, **kwargs)


def kernel_entry(fn: Fn, x: torch.Tensor, top: int = 8) -> dict:
    """The GPU work of one warm fn(x) call, from torch.profiler: how many kernels (and memsets or
    copies), their summed busy time, and the costliest by name. Busy time well under the wall
    time means the call is bound by launches, which CUDA graphs remove."""
    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            fn(x)
            torch.cuda.synchronize()
    busy: dict[str, float] = {}
    ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in ops:
        busy[e.name] = busy.get(e.name, 0.0) + e.time_range.elapsed_us()
    costliest = sorted(busy.items(), key=lambda item: -item[1])[:top]
    total = sum(busy.values())
    return {"gpu_ops": len(ops), "gpu_busy_us": total, "costliest_us": {k[:100]: round(v, 1) for k, v in costliest},
            "note": f"{len(ops)} GPU ops, {total:.0f} us busy; "
                    + ", ".join(f"{k[:40]} {v:.0f} us" for k, v in costliest[:4])}


def grouped_gemm_layouts(rec: Recorder, experts: RoutedExperts, rows: int, device: torch.device, plan: Plan) -> None:
    """The gate-up grouped GEMM alone on `rows` balanced rows, with the expert weights stored as
    they are (E, C, 2H) row-major, and column-major (the same matrices, transposed storage)."""
    if device.type != "cuda":
        rec.skip(f"grouped GEMM layouts, {rows} rows", "needs CUDA")
        return
    E = experts.n_experts
    x = torch.randn(rows, experts.width, device=device, dtype=BF16)
    offs = torch.linspace(rows / E, rows, E, device=device).round().to(torch.int32)
    w = experts.w_gate_up.detach().to(BF16)
    layouts = {"row-major": w.contiguous(), "column-major": w.mT.contiguous().mT}
    flops = 2 * experts.width * 2 * experts.hidden
    for name, weight in layouts.items():
        rec.measure(f"grouped GEMM gate-up, {rows} rows, weights {name}", forward_only,
                    lambda t, wt=weight: torch._grouped_mm(t, wt, offs=offs), x, device, plan, flops, graph=True)


def column_major_experts(experts: RoutedExperts, column_major: bool) -> None:
    """Store the expert weights column-major (each expert's matrix transposed in memory, shapes
    unchanged) or row-major again."""
    for p in (experts.w_gate_up, experts.w_down):
        p.data = p.data.mT.contiguous().mT if column_major else p.data.contiguous()


def ratio_entry(name: str, fwd: dict[str, dict | None]) -> dict:
    """grouped_mm forward time over the dense SwiGLU's, eager and from CUDA graphs (issue 5's target)."""
    entry: dict[str, Any] = {"name": name}
    notes = []
    for mode in ("eager", "graph"):
        moe, dense = fwd.get(f"grouped_mm {mode}"), fwd.get(f"dense {mode}")
        if moe and dense:
            entry[f"{mode}_ratio"] = moe["median_ms"] / dense["median_ms"]
            notes.append(f"{mode} {entry[f'{mode}_ratio']:.2f}x ({moe['median_ms']:.3f} / {dense['median_ms']:.3f} ms)")
    entry["note"] = ", ".join(notes) or "nothing to compare"
    return entry


class MoELayers(NamedTuple):
    cfg: DecoderConfig
    block: MoEBlock  # the decoder preset's MoE layer, bf16, eval
    dense: SwiGLU  # a dense SwiGLU with the same active FLOPs, bf16
    flops: float  # active forward FLOPs per token
    shared_hidden: int
    dense_hidden: int


def moe_layers(plan: Plan, device: torch.device) -> MoELayers:
    """The MoE layer of the plan's decoder preset and its dense counterpart, on the device (seed 0)."""
    cfg = decoder_preset(plan.decoder)
    shared_hidden = cfg.n_shared_experts * (cfg.shared_expert_hidden or cfg.expert_hidden)
    dense_hidden = cfg.top_k * cfg.expert_hidden + shared_hidden
    torch.manual_seed(0)
    with device:
        # Forward timings in eval mode, as inference runs: decoding-sized inputs (tokens x experts <=
        # DENSE_DISPATCH_ROWS) run every expert; larger ones the sorted grouped dispatch.
        block, dense = MoEBlock(cfg).to(BF16).eval(), SwiGLU(cfg.width, dense_hidden).to(BF16)
    # Active forward FLOPs per token: SwiGLU is 3 matmuls of width x hidden (top-k routed + shared), + router.
    flops = 6 * cfg.width * dense_hidden + 2 * cfg.width * cfg.n_routed_experts
    return MoELayers(cfg, block, dense, flops, shared_hidden, dense_hidden)


def moe_section(rec: Recorder, plan: Plan, device: torch.device) -> None:
    """One MoE layer of the decoder preset in bf16, each implementation, against a dense SwiGLU;
    grouped_mm and the dense SwiGLU also replayed from CUDA graphs."""
    cfg, block, dense, flops, shared_hidden, dense_hidden = moe_layers(plan, device)

    def moe(x: torch.Tensor) -> torch.Tensor:
        return block(x)[0]

    shape = (f"{cfg.n_routed_experts} routed experts top-{cfg.top_k} + shared hidden {shared_hidden}, "
             f"C={cfg.width} H={cfg.expert_hidden}, bf16; dense SwiGLU H={dense_hidden} has the same active FLOPs "
             f"({flops / 1e6:.1f} MFLOP per token forward, backward counted as 2x)")
    for n_tokens in plan.moe_tokens:
        x = torch.randn(1, n_tokens, cfg.width, device=device, dtype=BF16)
        with torch.no_grad():
            counts = block(x)[1].counts.float()
        rec.write({"name": f"MoE layer, {n_tokens} tokens", "note": f"{shape}; random routing: busiest expert "
                   f"{float(counts.max() / counts.mean()):.2f}x the mean load"})
        fwd: dict[str, dict | None] = {}
        for impl in ("grouped_mm", "padded_bmm", "loop"):
            use_experts(block.experts, impl)
            block.dense_dispatch_rows = DENSE_DISPATCH_ROWS if impl == "grouped_mm" else 0
            eager = rec.measure(f"MoE {impl} {n_tokens} tok fwd", forward_only, moe, x, device, plan, flops)
            if impl == "grouped_mm":
                fwd["grouped_mm eager"] = eager
                fwd["grouped_mm graph"] = cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph", device,
                                                       forward_only, moe, x, device, plan, flops, graph=True)
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, GPU kernels", device, kernel_entry, moe, x)
                block.overlap_shared = False  # the A/B of the shared experts' side stream
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph, shared on the main stream",
                             device, forward_only, moe, x, device, plan, flops, graph=True)
                block.overlap_shared = True
                split = block.experts.split_gate_up  # the A/B of gate and up as one or two grouped GEMMs
                block.experts.split_gate_up = split is None or not split  # None: one GEMM here (Triton activation)
                other = "two GEMMs" if block.experts.split_gate_up else "one GEMM"
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph, gate-up as {other}",
                             device, forward_only, moe, x, device, plan, flops, graph=True)
                block.experts.split_gate_up = split
                set_fused_kernels(block, False)  # the A/B of the Triton element-wise kernels (moe_lm.fused)
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph, eager element-wise",
                             device, forward_only, moe, x, device, plan, flops, graph=True)
                set_fused_kernels(block, True)
                block.fused_dispatch = False  # the A/B of the Triton route-and-dispatch kernels
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph, eager dispatch",
                             device, forward_only, moe, x, device, plan, flops, graph=True)
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, GPU kernels, eager dispatch", device,
                             kernel_entry, moe, x)
                block.fused_dispatch = True
                column_major_experts(block.experts, True)  # the A/B of the expert weights' storage
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph, column-major expert weights",
                             device, forward_only, moe, x, device, plan, flops, graph=True)
                column_major_experts(block.experts, False)
                block.dense_dispatch_rows = 0  # the A/B of running every expert on few tokens
                cuda_measure(rec, f"MoE grouped_mm {n_tokens} tok fwd, CUDA graph, always sorted dispatch",
                             device, forward_only, moe, x, device, plan, flops, graph=True)
                block.dense_dispatch_rows = DENSE_DISPATCH_ROWS
                grouped_gemm_layouts(rec, block.experts, n_tokens * cfg.top_k, device, plan)
            rec.measure(f"MoE {impl} {n_tokens} tok fwd+bwd", forward_backward, block, moe, x, device, plan, flops)
        fwd["dense eager"] = rec.measure(f"dense SwiGLU {n_tokens} tok fwd", forward_only, dense, x, device, plan,
                                         flops)
        fwd["dense graph"] = cuda_measure(rec, f"dense SwiGLU {n_tokens} tok fwd, CUDA graph", device, forward_only,
                                          dense, x, device, plan, flops, graph=True)
        set_fused_kernels(dense, False)
        cuda_measure(rec, f"dense SwiGLU {n_tokens} tok fwd, CUDA graph, eager element-wise", device, forward_only,
                     dense, x, device, plan, flops, graph=True)
        set_fused_kernels(dense, True)
        rec.measure(f"dense SwiGLU {n_tokens} tok fwd+bwd", forward_backward, dense, dense, x, device, plan, flops)
        rec.write(ratio_entry(f"MoE grouped_mm / dense SwiGLU {n_tokens} tok fwd", fwd))


# --------------------------------------------------------------------------- 5. decoder generation


def make_evidence(model: DefectModel | None, cfg: EvidenceConfig, batch: int, device: torch.device) -> torch.Tensor:
    """Evidence tokens (B, N, D_ev) from the DefectModel on random images, or random ones without a model."""
    if model is None:
        return torch.randn(batch, cfg.n_tokens, cfg.dim, device=device)
    size = model.config.encoder.img_size
    images = torch.rand(batch, 3, size, size, device=device, dtype=next(model.parameters()).dtype)
    out = model(images, use_memory=False)
    return evidence_tokens(out.patches, out.anomaly_map, out.image_prob, out.class_logits, cfg, images)


def generation_entry(report: ReportModel, evidence: torch.Tensor, prompt_len: int, new_tokens: int,
                     device: torch.device, plan: Plan, prefill_ms: float | None = None) -> dict:
    """Greedy generation of `new_tokens` for each evidence row (resampler + prefill + decode steps)."""
    batch = evidence.shape[0]
    prompts = torch.randint(3, report.config.decoder.vocab_size, (batch, prompt_len)).tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, eos_id=-1)  # no token is -1: every row runs to the end

    def run() -> None:
        generate(report.decoder, prompts, sampling, image_tokens=report.image_tokens(evidence))

    stats = measure(run, device, plan, iters=max(2, plan.iters // 10), budget_s=10 * plan.budget_s, warmup=1)
    entry = {**stats, "batch": batch}
    if new_tokens > 1:
        entry.update(rate=batch * new_tokens / stats["median_ms"] * 1e3, rate_unit="tok/s")
    if prefill_ms is not None and new_tokens > 1:
        step_ms = (stats["median_ms"] - prefill_ms) / (new_tokens - 1)
        entry.update(decode_step_ms=step_ms,
                     note=f"{step_ms:.2f} ms per decode step = {batch / step_ms * 1e3:.0f} tok/s after prefill")
    return entry


def decoder_section(rec: Recorder, plan: Plan, device: torch.device, model: DefectModel | None) -> None:
    """Greedy generation through the fusion path; image evidence comes from the DefectModel's output
    (random evidence of the same shape when section 1 could not build the model)."""
    enc = encoder_preset(plan.encoder)
    evidence_cfg = EvidenceConfig(patch_dim=enc.embed_dim, grid=enc.grid)
    config = language_config(plan.decoder, decoder_preset(plan.decoder).vocab_size, evidence_cfg)
    torch.manual_seed(0)
    with device:
        report = ReportModel(config).to(BF16).eval()
    dec = config.decoder
    source = f"{enc.preset} patch tokens + heatmap" if model is not None else "random evidence (no DefectModel)"
    params = sum(p.numel() for p in report.parameters())
    rec.write({"name": "report model", "note": (
        f"{source} -> resampler ({config.resampler.n_latents} tokens) -> gated cross-attn every "
        f"{dec.cross_attn_every} blocks; decoder {dec.preset}: C={dec.width}, depth {dec.depth}, "
        f"{dec.n_routed_experts} experts top-{dec.top_k}, {params / 1e6:.0f}M params, bf16 weights; greedy with "
        f"the KV cache, prompt {plan.prompt_len} tokens; times include the resampler")})
    for batch in plan.gen_batches:
        evidence = rec.attempt(f"evidence tokens b{batch}", make_evidence, model, evidence_cfg, batch, device)
        if evidence is None:
            continue
        prefill = rec.measure(f"report prefill + 1 token b{batch}", generation_entry, report, evidence,
                              plan.prompt_len, 1, device, plan)
        rec.measure(f"report generate {plan.new_tokens} tokens b{batch}", generation_entry, report, evidence,
                    plan.prompt_len, plan.new_tokens, device, plan, prefill and prefill["median_ms"])
        if device.type == "cuda":  # the A/B of the Triton element-wise kernels (moe_lm.fused) when decoding
            set_fused_kernels(report, False)
            prefill = rec.measure(f"report prefill + 1 token b{batch}, eager element-wise", generation_entry, report,
                                  evidence, plan.prompt_len, 1, device, plan)
            rec.measure(f"report generate {plan.new_tokens} tokens b{batch}, eager element-wise", generation_entry,
                        report, evidence, plan.prompt_len, plan.new_tokens, device, plan,
                        prefill and prefill["median_ms"])
            set_fused_kernels(report, True)


# --------------------------------------------------------------------------- main


def environment(device: torch.device, quick: bool) -> dict:
    info = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "device": str(device), "quick": quick, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    cuda=torch.version.cuda)
    return {"name": "environment", **info, "note": ", ".join(f"{k} {v}" for k, v in info.items())}


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_results.jsonl" if os.environ.get("OUT") else Path("bench_gpu.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=default_out(), help="JSON-lines file, appended to")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes for the generation section (default: the plan's)")
    parser.add_argument("--classes", type=int, default=0, metavar="K",
                        help="defect kinds the head names (default 0; 7 runs a named line's crop namer)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-vision", action="store_true", help="run section 1 alone (encoder, DefectModel)")
    only.add_argument("--only-generation", action="store_true", help="run section 5 alone")
    only.add_argument("--only-inspector", action="store_true", help="run section 2 alone")
    only.add_argument("--only-moe", action="store_true", help="run section 4 alone")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = QUICK if args.quick else FULL
    if args.gen_batches:
        plan = dataclasses.replace(plan, gen_batches=tuple(args.gen_batches))
    plan = dataclasses.replace(plan, classes=args.classes)
    rec = Recorder(args.out, device)
    rec.write(environment(device, args.quick))
    started = time.perf_counter()

    everything = not (args.only_vision or args.only_generation or args.only_inspector or args.only_moe)
    model = flops = None
    with torch.inference_mode():
        if not (args.only_inspector or args.only_moe):
            model = rec.attempt("build DefectModel", build_defect_model, plan, device)
        if model is not None and (everything or args.only_vision):
            flops = rec.attempt("section 1: encoder", vision_section, rec, plan, device, model)
    if everything or args.only_inspector:  # builds its Inspectors as serving does, outside inference mode
        rec.attempt("section 2: Inspector", inspector_section, rec, plan, device)
        free_memory()
    if model is not None and everything:
        with torch.inference_mode():
            rec.attempt("section 3: fp8", fp8_section, rec, plan, device, model, flops)
    free_memory()
    if everything or args.only_moe:
        rec.attempt("section 4: MoE layer", moe_section, rec, plan, device)
        free_memory()
    if everything or args.only_generation:
        with torch.inference_mode():
            rec.attempt("section 5: generation", decoder_section, rec, plan, device, model)
    rec.write({"name": "total wall time", "note": f"{time.perf_counter() - started:.0f} s; results in {args.out}"})


if __name__ == "__main__":
    main()
