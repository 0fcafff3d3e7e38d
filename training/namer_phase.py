"""The namer phase: teach the crop namer the pasted kinds on a line without class labels.

During defect training the namer sees only the few named defects of each batch, far too few
presentations in minutes (tiny, 180 s on a 2-core CPU: 0.33 of the held-out line named right).
This phase renders a pool of named defects on the line's own good images, cuts each out the way
inference does (``crop_features``, with jittered boxes because the map's region is rarely the
true mask), and trains the namer alone on it: cheap, since neither the ViT nor the decoder runs.
Offline on the synthetic metal line: 0.93 of the held-out defects named right after 60 CPU seconds.

Where the trained model is at hand (``region_of``), each pasted defect is cut out where the model's
own map puts it, as at inference, whenever enough of that region lies on the pasted mask; the rest
fall back to the jittered mask. The namer then learns on the boxes it will meet: on `s14` trained on the H200 it
named 0.94 of held-out pasted defects cut from their masks but only 0.77 of a held-out line cut
where the map said (the map's region is often larger, shifted, or joined by a second spot).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.training.data_cache import ImageCache
from lineinspect.training.named_pasting import RenderPool, paste_named_defects
from lineinspect.vision.crop_namer import CROP, crop_features
from lineinspect.vision.precision import autocast

Normalize = Callable[[torch.Tensor], torch.Tensor]  # (B,3,S,S) in [0, 1] -> the model's input
RegionOf = Callable[[torch.Tensor], torch.Tensor]  # (B,3,S,S) in [0, 1] -> the model's focus region (B,1,S,S)
# share of the model's region on the pasted mask for the region's box to name that defect; the region
# may hold a small second spot too, as at inference, where its box then grows around both
MIN_OVERLAP = 0.25
POOL_SHARE = 0.15  # of the phase's time: rendering the first pool; the rest trains (and renders more as needed)
POOL_MAX = 16000
BATCH = 128
MAX_REUSE = 16  # times each example is seen on average; beyond it, render new ones before the next step
LR = 2e-3
# Share of the mask-cut examples cut around a random part of the defect instead of all of it: on a
# held-out line the map often marks only part of a long scratch, and a crop zoomed in on that part
# was named as a blob (contamination, missing) - 9 of s14's 15 misnamed defects on one line.
# `bench/namer_retrain.py` on that s14 model, 150 s, map crops named right (true-mask crops):
# share 0 -> 0.2, seed 1: 0.869 (0.966) -> 0.903 (0.960); seed 0: share 0 0.886 (0.977), 0.15 0.920,
# 0.3 0.914, 0.5 0.897 (0.960-0.966). `tiny` (45 s, step-bound): 0.840 -> 0.834 at 0.2.
PARTIAL = 0.2
PARTIAL_EXTENT = (0.2, 0.7)  # the part's window, as a share of the defect's box on each axis


def partial_masks(masks: torch.Tensor, g: torch.Generator, share: float | None = None) -> torch.Tensor:
    """`masks` (B,1,S,S) with a random `share` (default PARTIAL) of them cut to a window of their own box
    (PARTIAL_EXTENT of its height and width at a random place); a cut that leaves nothing keeps the whole mask."""
    share = PARTIAL if share is None else share
    b, _, s, _ = masks.shape
    inside = masks[:, 0] > 0.5
    ar = torch.arange(s, dtype=torch.float32)
    rows, cols = inside.any(2), inside.any(1)
    y0 = torch.where(rows, ar, float(s)).amin(1)
    y1 = torch.where(rows, ar + 1, 0.0).amax(1)
    x0 = torch.where(cols, ar, float(s)).amin(1)
    x1 = torch.where(cols, ar + 1, 0.0).amax(1)
    lo, hi = PARTIAL_EXTENT
    f = lo + (hi - lo) * torch.rand(2, b, generator=g)
    u = torch.rand(2, b, generator=g)
    h, w = (y1 - y0).clamp_min(1), (x1 - x0).clamp_min(1)
    wy0 = y0 + u[0] * (1 - f[0]) * h
    wx0 = x0 + u[1] * (1 - f[1]) * w
    in_y = (ar[None] >= wy0[:, None]) & (ar[None] < (wy0 + f[0] * h)[:, None])  # (B, S)
    in_x = (ar[None] >= wx0[:, None]) & (ar[None] < (wx0 + f[1] * w)[:, None])
    window = (in_y[:, :, None] & in_x[:, None, :])[:, None].to(masks.dtype)
    cut = masks * window
    use = (torch.rand(b, generator=g) < share) & (cut.flatten(1).amax(1) > 0.5)
    return torch.where(use.view(b, 1, 1, 1), cut, masks)


def crops_where_found(images: torch.Tensor, masks: torch.Tensor, normalize: Normalize, g: torch.Generator,
                      region_of: RegionOf | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed crops (B, F) of pasted defects, and whether each was cut where the model's map put it
    (B,) bool; the others are cut around their jittered masks. images (B,3,S,S) in [0, 1]."""
    x = normalize(images)
    found = torch.zeros(len(images), dtype=torch.bool)
    if region_of is not None:
        region = region_of(images).float()
        on_mask = (region * (masks > 0.5)).sum((1, 2, 3)) / region.sum((1, 2, 3)).clamp_min(1.0)
        found = on_mask >= MIN_OVERLAP
    packed = torch.empty(len(images), 3 * CROP * CROP + 1)
    if found.any():
        packed[found] = crop_features(x[found], region[found])
    if (~found).any():
        packed[~found] = crop_features(x[~found], partial_masks(masks[~found], g), jitter=g)
    return packed, found


def namer_pool(cache: ImageCache, good: torch.Tensor, kinds: tuple[str, ...], g: torch.Generator, deadline: float,
               normalize: Normalize, limit: int = POOL_MAX, region_of: RegionOf | None = None,
               pool: RenderPool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Named defects pasted on random good training images, a batch of 32 at least, more until
    `deadline` or `limit` examples: packed crops (N, F) float16 and kind indices (N,). Crops are
    cut from `normalize`d images, as the head cuts them from the model's normalised input, where
    `region_of` finds them (``crops_where_found``)."""
    size = cache.images.shape[-1]
    crops, names, n = [], [], 0
    while n == 0 or (n < limit and time.monotonic() < deadline):
        idx = good[torch.randint(len(good), (32,), generator=g)]
        images = cache.images[idx.to(cache.images.device)].cpu().float().div_(255)
        sources = None if cache.sources is None else cache.sources[idx.numpy()]
        empty = torch.zeros(len(idx), 1, size, size)
        images, masks, _, kind = paste_named_defects(images, empty, torch.zeros(len(idx), dtype=torch.bool),
                                                     kinds, g, share=1.0, sources=sources, pool=pool)
        keep = kind >= 0
        crops.append(crops_where_found(images[keep], masks[keep], normalize, g, region_of)[0].half())
        names.append(kind[keep].cpu())
        n += int(keep.sum())
    return torch.cat(crops), torch.cat(names)


def accuracy(namer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    namer.eval()
    with torch.no_grad():
        right = sum(int((namer(x[i : i + 512].float()).argmax(1) == y[i : i + 512]).sum())
                    for i in range(0, len(y), 512))
    return round(right / max(len(y), 1), 4)


def train_namer(namer: torch.nn.Module, cache: ImageCache, good: torch.Tensor, kinds: tuple[str, ...],
                seed: int, seconds: float, device: torch.device, normalize: Normalize,
                dtype: torch.dtype | None = None, region_of: RegionOf | None = None,
                pool: RenderPool | None = None, min_steps: int = 1) -> dict:
    """Train `namer` (in place, float32) for about `seconds`, and at least `min_steps` steps (then the
    learning-rate schedule follows the steps), on a pool that keeps growing: where
    steps are cheap (a GPU) rendering is the bottleneck, and a namer that saw the same few
    hundred defects hundreds of times names the held-out line worse than one that saw more
    defects fewer times. Steps run under `dtype` autocast (the defect training's: bf16 on a 2-core
    CPU gave 422 steps in 60 s against 247 in fp32). A fifth of the first pool is held out; the
    namer as it came in is kept where the new one names that fifth worse. Returns notes for the
    model's calibration."""
    start = time.monotonic()
    g = torch.Generator().manual_seed(seed * 1000 + 777)
    first_x, first_y = namer_pool(cache, good, kinds, g, start + POOL_SHARE * seconds, normalize,
                                  region_of=region_of, pool=pool)
    n_held = len(first_y) // 5
    held_x, held_y = first_x[:n_held].to(device), first_y[:n_held].to(device)
    xs, ys = [first_x[n_held:].to(device)], [first_y[n_held:].to(device)]
    # channels-last weights: oneDNN's convolutions on a CPU run the namer's step in 67 instead of 100 ms (bf16)
    namer = namer.float().to(device, memory_format=torch.channels_last)
    notes = {"namer_heldout_before": accuracy(namer, held_x, held_y)}
    before = {k: v.clone() for k, v in namer.state_dict().items()}
    opt = torch.optim.AdamW(namer.parameters(), lr=LR, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    x, y = torch.cat(xs), torch.cat(ys)
    steps, t0 = 0, time.monotonic()
    namer.train()
    while time.monotonic() - start < seconds or steps < max(min_steps, 1):
        if steps * BATCH >= MAX_REUSE * len(y) and len(y) < POOL_MAX:
            more_x, more_y = namer_pool(cache, good, kinds, g, 0.0, normalize, region_of=region_of, pool=pool)
            xs.append(more_x.to(device))
            ys.append(more_y.to(device))
            x, y = torch.cat(xs), torch.cat(ys)
            continue
        elapsed = min(1.0, (time.monotonic() - t0) / max(seconds - (t0 - start), 1e-3))
        done = min(elapsed, steps / max(min_steps, 1))  # the time's share, or the steps' where they bind
        for group in opt.param_groups:  # cosine over what the phase has left
            group["lr"] = LR * max(0.05, 0.5 * (1 + np.cos(np.pi * done)))
        rows = torch.from_numpy(rng.integers(len(y), size=BATCH)).to(device)
        with autocast(device, dtype):  # the training's autocast (bf16 where the device has it natively)
            loss = F.cross_entropy(namer(x[rows].float()), y[rows], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    notes.update(namer_examples=int(len(y) + n_held), namer_steps=steps)
    after = accuracy(namer, held_x, held_y)
    notes["namer_refit_kept"] = after >= notes["namer_heldout_before"]
    if not notes["namer_refit_kept"]:
        namer.load_state_dict(before)
    notes["namer_heldout_accuracy"] = max(after, notes["namer_heldout_before"])  # of the namer kept
    namer.to(memory_format=torch.contiguous_format).eval()
    return notes
