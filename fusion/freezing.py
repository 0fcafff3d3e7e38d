"""Explicit freezing: freeze everything, unfreeze named parts, report what trains.

Names are parameter-name patterns: a prefix of dotted module path ("blocks.1.xattn"), or an
fnmatch pattern ("*.xattn.*", "resampler.*"). A pattern that matches nothing is an error, so a
typo cannot silently leave a part frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import NamedTuple

from torch import nn

from lineinspect.errors import LineInspectError

log = logging.getLogger(__name__)


class ParameterCounts(NamedTuple):
    trainable: int
    total: int


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def freeze(module: nn.Module) -> None:
    """Set requires_grad=False on every parameter."""
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Set requires_grad=True on parameters matching any pattern; return their names."""
    patterns = list(patterns)
    named = list(module.named_parameters())
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n, _ in named if _matches(n, pattern)]
        if not hits:
            raise LineInspectError(f"unfreeze: pattern {pattern!r} matches no parameter of {type(module).__name__}")
        chosen.extend(h for h in hits if h not in chosen)
    for name, p in named:
        if name in chosen:
            p.requires_grad_(True)
    return chosen


def parameter_counts(module: nn.Module) -> ParameterCounts:
    """Trainable and total parameter counts (tied parameters counted once)."""
    params = list(module.parameters())  # nn.Module.parameters() yields each shared tensor once
    return ParameterCounts(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def log_parameter_counts(module: nn.Module, label: str = "") -> ParameterCounts:
    """Log and return the counts, e.g. 'decoder: 1.2M of 10.0M parameters trainable (12.0%)'."""
    counts = parameter_counts(module)
    share = 100.0 * counts.trainable / max(counts.total, 1)
    log.info("%s: %s of %s parameters trainable (%.1f%%)", label or type(module).__name__,
             f"{counts.trainable:,}", f"{counts.total:,}", share)
    return counts
