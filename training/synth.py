"""Synthetic inspection data sets in the MVTec AD layout, and the words that describe a defect.

    out/train/good/0000.png ...               n good images
    out/test/good/0000.png ...                ceil(n / 4) good images
    out/test/<type>/0000.png ...              ceil(n / 8) images per defect type
    out/ground_truth/<type>/0000_mask.png     0/255 mask of each defective test image
    out/defects.jsonl                         one JSON object per test image (boxes, location, ...)
    out/README.txt                            how the set was generated

Every image draws from its own generator seeded by (seed, split, type, index), so a set is
byte-identical for a given seed and image i does not depend on n. Each file is written to a
temporary name and renamed, so an interrupted run never leaves half an image; defects.jsonl is
written last and marks a complete set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.images import encode_png
from lineinspect.training.defects import DEFECT_TYPES, render_defect
from lineinspect.training.surfaces import SURFACES, channel_max, make_surface

__all__ = [
    "DEFECT_TYPES", "SURFACES", "DefectInfo", "describe_defect", "location_word", "make_surface", "mask_boxes",
    "render_defect", "severity_word", "size_word", "write_synthetic_dataset",
]

_MARKER = "lineinspect synthetic defect data set"  # first line of README.txt
_SPLITS = {"train": 0, "test": 1}
_CLASSES = ("good", *DEFECT_TYPES)


# --------------------------------------------------------------------------- defect metadata


_LOCATIONS = (("top left", "top", "top right"), ("left", "center", "right"),
              ("bottom left", "bottom", "bottom right"))
# Limits put about a third of the generator's defects in each word (measured on 420 of them).
SIZE_LIMITS = (0.004, 0.016)  # area fraction: small below 0.4 %, large from 1.6 %
SEVERITY_LIMITS = (0.0075, 0.016)  # contrast * sqrt(area fraction), see severity_word


@dataclass(frozen=True)
class DefectInfo:
    """What a caption or a report says about one painted defect."""

    type: str
    boxes: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive
    location: str  # 3x3-grid word for the mask centroid, e.g. "top left", "center"
    size: str  # small / medium / large
    severity: str  # low / medium / high
    area_fraction: float
    contrast: float  # mean absolute change inside the mask, 0..1

    def to_dict(self) -> dict:
        return {"type": self.type, "boxes": [list(b) for b in self.boxes], "location": self.location,
                "size": self.size, "severity": self.severity, "area_fraction": round(self.area_fraction, 6),
                "contrast": round(self.contrast, 4)}


def describe_defect(kind: str, before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> DefectInfo:
    """Metadata of a defect from the image before and after painting and its bool (H, W) mask."""
    if not mask.any():
        raise ValueError("describe_defect needs a non-empty mask")
    area = float(mask.mean())
    contrast = float(channel_max(cv2.absdiff(before, after))[mask].mean()) / 255
    return DefectInfo(kind, mask_boxes(mask), location_word(mask), size_word(area),
                      severity_word(contrast, area), area, contrast)


def mask_boxes(mask: np.ndarray, merge_px: int | None = None) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1), x1/y1 exclusive, of the connected parts of a bool (H, W) mask.

    Parts closer than `merge_px` (default 2 % of the short side, at least 2 px) count as one, so
    a dust cluster or a scratch that fades in and out is one box, not dozens. Each box is tight
    around its own mask pixels. Sorted top-to-bottom, left-to-right."""
    if merge_px is None:
        merge_px = max(2, round(0.02 * min(mask.shape)))
    m = mask.astype(np.uint8)
    grown = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * merge_px + 1,) * 2))
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    boxes = []
    for i in range(1, count):
        ys, xs = np.nonzero((labels == i) & mask)
        if ys.size:
            boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def location_word(mask: np.ndarray) -> str:
    """Which ninth of the image (3x3 grid) holds the centroid of a bool (H, W) mask."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    row = min(2, int(3 * ys.mean() / h))
    col = min(2, int(3 * xs.mean() / w))
    return _LOCATIONS[row][col]


def size_word(area_fraction: float) -> str:
    return "small" if area_fraction < SIZE_LIMITS[0] else "medium" if area_fraction < SIZE_LIMITS[1] else "large"


def severity_word(contrast: float, area_fraction: float) -> str:
    """low / medium / high from contrast * sqrt(area fraction): how visible the defect is overall.
    The square root keeps long thin defects (a clear scratch) from all reading as low."""
    score = contrast * math.sqrt(area_fraction)
    return "low" if score < SEVERITY_LIMITS[0] else "medium" if score < SEVERITY_LIMITS[1] else "high"


# --------------------------------------------------------------------------- data set writer



def write_synthetic_dataset(out: Path, n: int, seed: int, surface: str = "mixed", size: int = 256) -> dict:
    """Write a synthetic MVTec-layout data set into `out` (see the module docstring).

    `surface` is one of SURFACES, or "mixed" to pick one per image. `out` must be missing, empty,
    or a synthetic set written earlier (its files are replaced; stale ones removed).
    Returns a summary: {"out", "seed", "surface", "size", "counts": {"train/good": n, ...}}.
    """
    out = Path(out)
    _check_args(out, n, seed, surface, size)
    _prepare(out)
    written: set[Path] = set()
    records: list[dict] = []
    for i in range(n):
        image, _ = _surface(_rng(seed, "train", "good", i), surface, size)
        written.add(_write(out / "train" / "good" / f"{i:04d}.png", encode_png(image)))
    for label in _CLASSES:
        count = math.ceil(n / 4) if label == "good" else math.ceil(n / 8)
        for i in range(count):
            records.append(_write_test(out, label, i, seed, surface, size, written))
    _remove_stale(out, written)
    _write(out / "README.txt", _readme(n, seed, surface, size).encode())
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    _write(out / "defects.jsonl", lines.encode())
    counts = {"train/good": n, "test/good": math.ceil(n / 4)}
    counts.update({f"test/{t}": math.ceil(n / 8) for t in DEFECT_TYPES})
    return {"out": str(out), "seed": seed, "surface": surface, "size": size, "counts": counts}


def _check_args(out: Path, n: int, seed: int, surface: str, size: int) -> None:
    if surface != "mixed" and surface not in SURFACES:
        raise LineInspectError(f"unknown surface {surface!r}; choose mixed or one of: {', '.join(SURFACES)}")
    if n < 1:
        raise LineInspectError(f"n={n}: a data set needs at least one training image")
    if seed < 0:
        raise LineInspectError(f"seed={seed}: use a non-negative integer seed")
    if not 16 <= size <= 4096:
        raise LineInspectError(f"size={size} is out of range; use 16 to 4096 pixels")
    if out.exists() and not out.is_dir():
        raise LineInspectError(f"{out}: exists and is not a folder; choose a folder for the data set")


def _prepare(out: Path) -> None:
    """Refuse a non-empty folder unless a synthetic set lives there; drop temporaries of an
    interrupted run."""
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.txt"
        first = readme.read_text(errors="replace").split("\n", 1)[0] if readme.is_file() else ""
        if first != _MARKER:
            raise LineInspectError(
                f"{out}: folder is not empty and holds no synthetic data set (no {readme.name} from "
                "lineinspect); choose a new or empty folder so nothing of yours is overwritten"
            )
        for tmp in out.rglob(".*.tmp"):
            tmp.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # README first: a run interrupted from here on leaves a folder a rerun may overwrite
    if not (out / "README.txt").is_file():
        _write(out / "README.txt", (_MARKER + "\n(generation in progress)\n").encode())


def _rng(seed: int, split: str, label: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], _CLASSES.index(label), index])


def _surface(rng: np.random.Generator, surface: str, size: int) -> tuple[np.ndarray, str]:
    kind = SURFACES[rng.integers(len(SURFACES))] if surface == "mixed" else surface
    return make_surface(kind, size, rng), kind


def _write_test(out: Path, label: str, i: int, seed: int, surface: str, size: int,
                written: set[Path]) -> dict:
    """Write test image i of class `label` (and its mask) and return its defects.jsonl record."""
    stem = f"{i:04d}"
    rng = _rng(seed, "test", label, i)
    image, kind = _surface(rng, surface, size)
    record = {"path": f"test/{label}/{stem}.png", "split": "test", "type": label, "surface": kind,
              "boxes": [], "location": None, "size": None, "severity": None, "area_fraction": 0.0,
              "mask": None}
    if label != "good":
        defective, mask = render_defect(image, label, rng)
        info = describe_defect(label, image, defective, mask)
        record.update({k: v for k, v in info.to_dict().items() if k != "type"})
        record["mask"] = f"ground_truth/{label}/{stem}_mask.png"
        written.add(_write(out / record["mask"], encode_png(mask.astype(np.uint8) * 255)))
        image = defective
    written.add(_write(out / record["path"], encode_png(image)))
    return record


def _write(path: Path, data: bytes) -> Path:
    """Write bytes under a temporary name then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _remove_stale(out: Path, written: set[Path]) -> None:
    """Delete images and masks of an earlier, larger synthetic set written here."""
    folders = [out / "train" / "good"] + [out / "test" / c for c in _CLASSES]
    folders += [out / "ground_truth" / t for t in DEFECT_TYPES]
    for folder in folders:
        for path in folder.glob("[0-9][0-9][0-9][0-9]*.png"):
            if path not in written:
                path.unlink()


def _readme(n: int, seed: int, surface: str, size: int) -> str:
    types = ", ".join(DEFECT_TYPES)
    return f"""{_MARKER}
Generated by lineinspect.training.synth.write_synthetic_dataset(n={n}, seed={seed}, surface={surface!r}, \
size={size}).

Layout (MVTec AD): train/good/ holds {n} defect-free images; test/good/ {math.ceil(n / 4)} more;
test/<type>/ {math.ceil(n / 8)} defective images for each type ({types});
ground_truth/<type>/<stem>_mask.png is the 0/255 mask of exactly the pixels the defect changed.
defects.jsonl has one JSON object per test image: path, split, type, surface, boxes
(x0, y0, x1, y1 in pixels, x1/y1 exclusive), location (3x3 grid word of the mask centroid),
size (small < {SIZE_LIMITS[0]:.1%} of the image, medium < {SIZE_LIMITS[1]:.1%}, large), severity (mean
absolute change in the mask (contrast, 0..1) x sqrt(area_fraction): low < {SEVERITY_LIMITS[0]}, medium <
{SEVERITY_LIMITS[1]}, high), area_fraction, contrast, mask.

Surfaces ({', '.join(SURFACES)}) are procedural textures with normal variation (tone, lighting,
noise, small pose changes); defects are painted procedurally. Every image has its own random
stream seeded by (seed, split, type, index): the same seed always gives byte-identical files.
Synthetic images are for tests, demos and pre-training; measure accuracy on real images.
"""
