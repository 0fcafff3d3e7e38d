"""CUDA graphs for the fast path: the defect model replayed from graphs captured at start-up.

A CUDA graph records every kernel of one forward pass once and then replays them all with one
launch, so a batch-1 ViT-L/14 costs its GPU time (1.42 ms on an H200) instead of its Python and
kernel-launch overhead (5.08 ms eager; bench/RESULTS.md). A graph fixes its shapes and its memory,
so each batch-size bucket (1, 2, 4, ... 64) has a static input buffer and a graph of its own,
captured once. A batch runs in the smallest bucket that holds it; the rows after it keep whatever
an earlier batch left there and are ignored (the model computes every row on its own, so padding
cannot change the real rows).

Frames enter as decoded uint8 pixels and are resized on the GPU (`preprocess.frames_into`), so the
CPU only decodes; each batch's results leave in one copy to pinned host memory.

Precision: the graphs run a copy of the model with bf16 weights instead of autocast over fp32
weights, which would re-cast every weight on every call (ViT-L/14 eager at batch 1: 7.22 ms
against 5.08 ms). BatchNorm in eval mode is a per-channel affine map whose bf16 running statistics
are as exact as the bf16 activations it scales. The memory bank stays fp32: its distances subtract
nearly equal numbers. The frames stay fp32 too (the model casts them to its weights' type after
normalising): the region statistics read grey levels from them, and bf16 rounds the upper half of the
grey range to 1/256 steps (region scores 0.2 standard deviations off the eager path's in the graph tests).

Thread safety: a run writes the static buffers of its bucket, replays, and copies out what it
returns before the next run may start; a lock makes concurrent callers take turns. The serving
engine calls the Inspector from its one batch worker thread (its warm-up call runs in a pool
thread before the worker starts), so the lock is never contended there.

Importable without CUDA: only constructing a runner with ``capture=True`` needs a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from lineinspect.errors import LineInspectError
from lineinspect.vision.defect_model import DefectModel
from lineinspect.vision.preprocess import frames_into

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
T = TypeVar("T")


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds a batch of n (buckets sorted ascending)."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"a batch of {n} exceeds the largest bucket ({buckets[-1]}); split it first")


def split_batch(n: int, largest: int) -> list[slice]:
    """Consecutive slices of at most `largest` items covering range(n)."""
    return [slice(start, min(start + largest, n)) for start in range(0, n, largest)]


def copy_rows(value: T, n: int) -> T:
    """The first n rows of a tensor, or of each tensor in a (named) tuple of optional tensors, copied."""
    if isinstance(value, torch.Tensor):
        return value[:n].clone()
    return type(value)(*(None if t is None else t[:n].clone() for t in value))


def cat_rows(parts: Sequence[T]) -> T:
    """Tensors or (named) tuples of optional tensors, concatenated along the rows into new memory."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*parts)))


def inference_copy(model: DefectModel, dtype: torch.dtype) -> DefectModel:
    """A frozen copy of `model` on its device with weights in `dtype` and the memory banks in fp32.

    Built fresh and loaded from the state dict, so no hooks come along; the banks' buffers are copied
    from `model` in fp32, the unsaved ones included (a 0.99 quantile level rounded to bf16 is 0.988, which
    moved region scores by up to 3 standard deviations). Later changes to `model` do not reach the copy.
    """
    with next(model.parameters()).device:
        twin = DefectModel(model.config)
    twin.to(dtype)
    twin.load_state_dict(model.state_dict())
    for name in ("memory", "regions"):  # every buffer, the unsaved ones too (the quantile levels), in fp32
        source = dict(getattr(model, name).named_buffers())
        for key, buffer in getattr(twin, name).float().named_buffers():
            buffer.copy_(source[key])
    return twin.eval().requires_grad_(False)


def capture_graph(fn: Callable[[], T], device: torch.device, warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, T]:
    """A CUDA graph of fn (which reads static buffers) and fn's static output, as the PyTorch docs
    prescribe: warm-up calls on a side stream first (lazy initialisation, autotuning), then capture."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            out = fn()
    return graph, out


@dataclass(frozen=True)
class GraphResult(Generic[T]):
    rows: np.ndarray  # (n, P) the forward's packed rows, in host memory of their own
    images: torch.Tensor | None = None  # (n, 3, S, S) copy of the model's input on the device, if kept
    extra: T | None = None  # copy of the forward's other output (first n rows), if kept


@dataclass
class _Bucket(Generic[T]):
    images: torch.Tensor  # static input (size, 3, S, S)
    graph: torch.cuda.CUDAGraph | None  # None: run the forward eagerly (capture=False)
    rows: torch.Tensor | None = None  # static outputs of the graph
    extra: Any = None


class CudaGraphRunner(Generic[T]):
    """Runs `forward(images) -> (rows, extra)` on batches of uint8 frames, one graph per bucket.

    `forward` maps (B, 3, S, S) images in [0, 1] to rows (B, P) of everything the host needs,
    and anything else `extra` the caller may want on the device. With ``capture=False`` the same
    buffers, buckets and copies run without graphs (CPU tests, or to rule a graph out).
    """

    def __init__(self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, T]], image_size: int,
                 device: torch.device, buckets: Sequence[int] = BUCKETS,
                 capture: bool = True, warmup: int = 3) -> None:
        if capture and device.type != "cuda":
            raise LineInspectError(f"CUDA graphs need a CUDA device, got {device}")
        if not buckets or min(buckets) < 1:
            raise LineInspectError(f"batch buckets must be positive sizes, got {tuple(buckets)}")
        self.forward = forward
        self.device = device
        self.buckets = tuple(sorted(set(buckets)))
        self._lock = threading.Lock()
        with torch.inference_mode():
            self._buckets = {b: self._bucket(b, image_size, capture, warmup) for b in self.buckets}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _bucket(self, size: int, image_size: int, capture: bool, warmup: int) -> _Bucket[T]:
        images = torch.zeros(size, 3, image_size, image_size, device=self.device)  # float32: see the module's docstring
        if not capture:
            return _Bucket(images, None)
        graph, (rows, extra) = capture_graph(lambda: self.forward(images), self.device, warmup)
        return _Bucket(images, graph, rows, extra)

    @torch.inference_mode()
    def run(self, frames: list[np.ndarray], keep: bool = False) -> GraphResult[T]:
        """RGB uint8 (H, W, 3) frames, at most `max_batch` -> their rows on the host (one copy, one
        synchronisation); with `keep`, also device copies of the model's input and extra output."""
        n = len(frames)
        bucket = self._buckets[bucket_for(n, self.buckets)]
        pinned = self.device.type == "cuda"
        with self._lock:
            frames_into(frames, bucket.images)
            if bucket.graph is None:
                rows, extra = self.forward(bucket.images)
            else:
                bucket.graph.replay()
                rows, extra = bucket.rows, bucket.extra
            host = torch.empty(n, rows.shape[1], dtype=rows.dtype, pin_memory=pinned)
            host.copy_(rows[:n], non_blocking=pinned)
            kept = (copy_rows(bucket.images, n), copy_rows(extra, n)) if keep else (None, None)
            if pinned:
                torch.cuda.current_stream(self.device).synchronize()
        return GraphResult(host.numpy(), *kept)
