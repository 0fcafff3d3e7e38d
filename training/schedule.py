"""Learning-rate schedule as a pure function of training progress."""

from __future__ import annotations

import math


def lr_at(progress: float, base_lr: float, warmup: float = 0.05, floor: float = 0.02) -> float:
    """Linear warm-up over the first `warmup` of progress, then cosine decay to `floor * base_lr`.

    progress in [0, 1]: the larger of steps done / steps planned and time used / time budget,
    so a run cut short by its time budget still ends its schedule at the low learning rate.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr * progress / warmup
    t = (progress - warmup) / max(1e-9, 1 - warmup)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
