"""Paste the generator's named defect kinds (scratch, crack, ...) onto a line's good images.

Besides the generic synthetic defects, training renders these realistic kinds on the line's own
surfaces (`--paste-types`, all by default). Leaving some kinds out of the pasting and testing on
them measures generalisation to defects nobody predicted. Each pasted image's kind is returned
too, for objectives that want to name it.

Given the images at a higher source resolution, each defect is painted there and its change
shrunk to model resolution the way inference shrinks camera frames (area averaging), so thin
and small defects arrive as faint as real ones do.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import cv2
import numpy as np
import torch

from lineinspect.errors import LineInspectError
from lineinspect.training.surfaces import channel_max

MASK_COVER = 0.25  # a model pixel belongs to a defect painted at source resolution from this coverage
POOL_DIED = ("a defect-painting process died (out of memory?); train with fewer --render-workers, or 0 to paint in "
             "the training process")


def paste_named_defects(images: torch.Tensor, masks: torch.Tensor, has: torch.Tensor, kinds: tuple[str, ...],
                        g: torch.Generator, share: float = 0.5, sources: np.ndarray | None = None,
                        pool: RenderPool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace a `share` of the defect-free images in the batch by ones with a named defect.

    images (B,3,S,S) in [0,1]; masks (B,1,S,S); has (B,) bool; sources: the same images
    (B,P,P,3) uint8 at a resolution P > S to paint at, or None to paint at S. Returns the
    updated triple and each image's kind as an index into `kinds` (B,) long, -1 where nothing
    named was pasted. Each defect is painted from its own seed, so `pool` (worker processes)
    changes only how fast, never what, is painted.
    """
    return finish_named_defects(images, masks, has, start_named_defects(images, has, kinds, g, share, sources, pool))


class NamedPaintings(NamedTuple):
    """A batch's named defects, chosen and painted or being painted in a RenderPool."""
    chosen: list[tuple[int, int]]  # (row of the batch, index into the kinds)
    painted: list  # paint_one's results, or futures of them


def start_named_defects(images: torch.Tensor, has: torch.Tensor, kinds: tuple[str, ...], g: torch.Generator,
                        share: float = 0.5, sources: np.ndarray | None = None, pool: RenderPool | None = None
                        ) -> NamedPaintings:
    """Choose which free images get which kind and start painting them (in `pool`, without waiting);
    `finish_named_defects` pastes them. Arguments as in paste_named_defects."""
    from lineinspect.training.defects import DEFECT_TYPES

    unknown = [k for k in kinds if k not in DEFECT_TYPES]
    if unknown:
        raise LineInspectError(f"--paste-types: unknown defect type(s) {unknown}; choose from {DEFECT_TYPES}")
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
    chosen = [(i, int(rng.integers(len(kinds))), int(rng.integers(2**63)))
              for i in torch.nonzero(~has).flatten().tolist() if rng.random() < share]
    size = images.shape[-1]
    tasks = [(sources[i] if sources is not None else _as_uint8(images[i]), kinds[k], seed, size, sources is not None)
             for i, k, seed in chosen]
    painted = pool.submit(tasks) if pool is not None else [paint_one(t) for t in tasks]
    return NamedPaintings([(i, k) for i, k, _ in chosen], painted)


def finish_named_defects(images: torch.Tensor, masks: torch.Tensor, has: torch.Tensor, paintings: NamedPaintings
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste `paintings` (waiting for any still being painted) on the images they were started for."""
    images, masks, has = images.clone(), masks.clone(), has.clone()
    kind_index = torch.full((len(images),), -1, dtype=torch.long)
    for (i, k), result in zip(paintings.chosen, paintings.painted):
        y0, x0, change, mask, added = _painted(result)
        h, w = mask.shape
        window = images[i, :, y0:y0 + h, x0:x0 + w]
        new = torch.from_numpy(change).permute(2, 0, 1).to(images)
        images[i, :, y0:y0 + h, x0:x0 + w] = (window + new).clamp_(0, 1) if added else new
        masks[i, 0, y0:y0 + h, x0:x0 + w] = torch.from_numpy(mask).to(masks)
        has[i] = bool(mask.any())
        kind_index[i] = k if has[i] else -1
    return images, masks, has, kind_index.to(images.device)


def _painted(result: tuple | Future) -> tuple:
    if not isinstance(result, Future):
        return result
    try:
        return result.result()
    except BrokenProcessPool as e:
        raise LineInspectError(POOL_DIED) from e


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def paint_one(task: tuple[np.ndarray, str, int, int, bool]) -> tuple[int, int, np.ndarray, np.ndarray, bool]:
    """Paint one defect: task (image uint8 (H,W,3), kind, seed, model size S, whether the image is the
    higher-resolution source). Returns (y0, x0, values (h,w,3) float32, mask (h,w) bool, added) for the
    window of the model-resolution image that changes: at source resolution the change to add, else
    the new pixel values (in [0, 1])."""
    from lineinspect.training.defects import render_defect

    image, kind, seed, size, at_source = task
    out, mask = render_defect(image, kind, np.random.default_rng(seed))
    if not at_source:  # the mask covers every pixel render_defect changed
        return _cut(out.astype(np.float32) / 255, mask, mask, added=False)
    shrink = (size, size)
    before = cv2.resize(image, shrink, interpolation=cv2.INTER_AREA).astype(np.float32)
    after = cv2.resize(out, shrink, interpolation=cv2.INTER_AREA).astype(np.float32)
    cover = cv2.resize(mask.astype(np.float32), shrink, interpolation=cv2.INTER_AREA)
    small = cover >= MASK_COVER
    if not small.any():  # a defect too small to cover a quarter pixel: keep its strongest pixel
        small = cover >= cover.max()
    change = (after - before) / 255
    return _cut(change, small, small | (channel_max(np.abs(change)) > 0), added=True)


def _cut(values: np.ndarray, mask: np.ndarray, changed: np.ndarray, added: bool
         ) -> tuple[int, int, np.ndarray, np.ndarray, bool]:
    """The bounding window of `changed` (H,W) bool: (y0, x0, values there, mask there, added)."""
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return int(y0), int(x0), np.ascontiguousarray(values[y0:y1, x0:x1]), mask[y0:y1, x0:x1].copy(), added


class RenderPool:
    """Worker processes that paint named defects: rendering runs on the host, one core per process,
    and where a GPU trains (a step of tens of ms) one core painting every defect bounds the training."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a render pool needs at least one worker, got {workers}")
        # spawn, not fork: the trainer may already hold a CUDA context, which a forked child cannot use
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_one_thread_each)

    def submit(self, tasks: list) -> list[Future]:
        try:
            return [self._executor.submit(paint_one, task) for task in tasks]
        except BrokenProcessPool as e:
            raise LineInspectError(POOL_DIED) from e

    def close(self) -> None:
        self._executor.shutdown(cancel_futures=True)


def _one_thread_each() -> None:
    cv2.setNumThreads(1)  # the pool's processes share the host's cores
