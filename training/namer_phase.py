"""The namer phase: teach the crop namer the pasted kinds on a line without class labels.

During defect training the namer sees only the few named defects of each batch, far too few
presentations in minutes (tiny, 180 s on a 2-core CPU: 0.33 of the held-out line named right).
This phase renders a pool of named defects on the line's own good images, cuts each out the way
inference does (``crop_features``, with jittered boxes because the map's region is rarely the
true mask), and trains the namer alone on it: cheap, since neither the ViT nor the decoder runs.
Offline on the synthetic metal line: 0.93 of the held-out defects named right after 60 CPU seconds.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.training.data_cache import ImageCache
from lineinspect.training.named_pasting import paste_named_defects
from lineinspect.vision.crop_namer import crop_features

POOL_SHARE = 0.35  # of the phase's time: rendering the pool; the rest trains
POOL_MAX = 16000
BATCH = 128


def namer_pool(cache: ImageCache, good: torch.Tensor, kinds: tuple[str, ...], seed: int, deadline: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Named defects pasted on random good training images until `deadline`: packed crops
    (N, F) float16 and kind indices (N,)."""
    g = torch.Generator().manual_seed(seed * 1000 + 777)
    size = cache.images.shape[-1]
    crops, names, n = [], [], 0
    while n < POOL_MAX and (n == 0 or time.monotonic() < deadline):
        idx = good[torch.randint(len(good), (32,), generator=g)]
        images = cache.images[idx.to(cache.images.device)].cpu().float().div_(255)
        sources = None if cache.sources is None else cache.sources[idx.numpy()]
        empty = torch.zeros(len(idx), 1, size, size)
        images, masks, _, kind = paste_named_defects(images, empty, torch.zeros(len(idx), dtype=torch.bool),
                                                     kinds, g, share=1.0, sources=sources)
        keep = kind >= 0
        crops.append(crop_features(images[keep], masks[keep], jitter=g).half())
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
                seed: int, seconds: float, device: torch.device) -> dict:
    """Train `namer` (in place, float32) on a fresh pool for about `seconds`. A fifth of the pool
    is held out; the namer as it came in is kept where the new one names that fifth worse.
    Returns notes for the model's calibration."""
    start = time.monotonic()
    x, y = namer_pool(cache, good, kinds, seed, start + POOL_SHARE * seconds)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    held, fit = perm[: len(perm) // 5], perm[len(perm) // 5 :]
    x, y = x.to(device), y.to(device)
    namer = namer.float().to(device)
    notes = {"namer_examples": int(len(y)), "namer_heldout_before": accuracy(namer, x[held], y[held])}
    before = {k: v.clone() for k, v in namer.state_dict().items()}
    opt = torch.optim.AdamW(namer.parameters(), lr=2e-3, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    steps, planned, t0 = 0, None, time.monotonic()
    namer.train()
    while time.monotonic() - start < seconds or steps == 0:
        rows = fit[torch.from_numpy(rng.integers(len(fit), size=BATCH))]
        loss = F.cross_entropy(namer(x[rows].float()), y[rows], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if planned is None and steps == 5:  # anneal the rate over the steps the time allows
            per_step = (time.monotonic() - t0) / steps
            planned = steps + max(1, int((seconds - (time.monotonic() - start)) / per_step))
        if planned is not None:
            for group in opt.param_groups:
                group["lr"] = 2e-3 * max(0.05, 0.5 * (1 + np.cos(np.pi * min(1.0, steps / planned))))
    notes["namer_steps"] = steps
    after = accuracy(namer, x[held], y[held])
    notes["namer_refit_kept"] = after >= notes["namer_heldout_before"]
    if not notes["namer_refit_kept"]:
        namer.load_state_dict(before)
    notes["namer_heldout_accuracy"] = max(after, notes["namer_heldout_before"])  # of the namer kept
    namer.eval()
    return notes
