"""Anomaly map post-processing: resize, smooth, and turn a map into boxes.

All functions are pure numpy/OpenCV on (H, W) float maps; boxes use the `Box` convention of
`lineinspect.vision.result` (x0, y0 inclusive, x1, y1 exclusive, in map pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from lineinspect.vision.result import Box

LEVEL_OVERLAP = 0.3  # a lower level's box this close to a kept one is the same defect, loosely cut

PEAK_HALF = 0.5  # a peak box holds the pixels above half the way from the map's median to its peak

__all__ = ["box_iou", "boxes_at_levels", "boxes_from_map", "peak_box", "scale_boxes", "smooth_map", "split_at_seeds",
           "upsample_map"]


def _check_map(anomaly_map: np.ndarray, name: str = "anomaly_map") -> np.ndarray:
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.ndim != 2 or anomaly_map.size == 0:
        raise ValueError(f"{name} must be a non-empty (H, W) array, got shape {anomaly_map.shape}")
    if not np.issubdtype(anomaly_map.dtype, np.number) and anomaly_map.dtype != np.bool_:
        raise ValueError(f"{name} must be numeric, got dtype {anomaly_map.dtype}")
    return anomaly_map


def upsample_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an (h, w) map to (height, width) float32 (also fine for shrinking)."""
    anomaly_map = _check_map(anomaly_map)
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got height={height}, width={width}")
    src = anomaly_map.astype(np.float32, copy=False)
    if src.shape == (height, width):
        return src.copy()
    return cv2.resize(src, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def smooth_map(anomaly_map: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma_px` pixels -> float32; sigma <= 0 returns a copy.

    The kernel size is left to OpenCV (about 8 sigma wide for float input); borders reflect.
    """
    src = _check_map(anomaly_map).astype(np.float32, copy=True)
    if sigma_px <= 0:
        return src
    return cv2.GaussianBlur(src, (0, 0), sigmaX=float(sigma_px), sigmaY=float(sigma_px))


def split_at_seeds(binary: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Label image (int32, 0 = background) that splits the 8-connected regions of `binary`
    between the seed components inside them: each pixel joins its nearest seed of the same region.

    One defect map often melts neighbouring defects into one region at the threshold that best
    separates defect from background pixels; their cores (`seeds`, a stricter threshold) stay
    apart. A region with no seed keeps one label. Nearest by Euclidean distance (OpenCV's
    distance transform with labels), so the cost is linear in pixels, with no flooding loop.
    """
    n_regions, regions = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    seeds = seeds & (binary > 0)
    if not seeds.any():
        return regions
    # Label of the nearest seed component for every pixel (seed pixels are the zeros).
    _, nearest = cv2.distanceTransformWithLabels((~seeds).astype(np.uint8), cv2.DIST_L2, 5,
                                                 labelType=cv2.DIST_LABEL_CCOMP)
    seed_region = np.zeros(nearest.max() + 1, np.int64)
    seed_region[nearest[seeds]] = regions[seeds]
    same = seed_region[nearest] == regions  # the nearest seed lies in this pixel's own region
    # Seeded pixels take (region, seed); the rest of their region, if any, (region, none).
    key = np.where(same, nearest.astype(np.int64) + n_regions, regions.astype(np.int64))
    key[binary == 0] = 0
    _, inverse = np.unique(key, return_inverse=True)
    return inverse.reshape(binary.shape).astype(np.int32)  # key 0 (background) stays label 0


def boxes_from_map(
    anomaly_map: np.ndarray,
    threshold: float,
    min_area: int = 16,
    max_boxes: int = 32,
    label: str = "",
    seed_threshold: float | None = None,
) -> list[Box]:
    """Boxes around the 8-connected regions where ``anomaly_map >= threshold``.

    With `seed_threshold`, a region holding several separate cores (``>= seed_threshold``) is
    split between them (`split_at_seeds`), so touching defects get a box each. Each box's score
    is the peak map value inside its region (not inside its rectangle, which may cover part of a
    neighbour). Regions with fewer than `min_area` pixels are dropped; the rest are sorted by
    score descending (ties: top-most, then left-most first) and cut to `max_boxes`.
    """
    anomaly_map = _check_map(anomaly_map)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if min_area < 1 or max_boxes < 0:
        raise ValueError(f"min_area must be >= 1 and max_boxes >= 0, got {min_area} and {max_boxes}")
    values = anomaly_map.astype(np.float64, copy=False)
    binary = (values >= threshold).astype(np.uint8)  # NaN compares False: never a defect pixel
    if seed_threshold is None:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    else:
        labels = split_at_seeds(binary, values >= seed_threshold)
        n, stats = int(labels.max()) + 1, _label_stats(labels)
    if n <= 1 or max_boxes == 0:
        return []
    # Peak value per component in one pass over the foreground pixels.
    fg = labels > 0
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, labels[fg], values[fg])
    # Filter and rank with array operations: a noisy map can hold ~10^5 components.
    keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area)
    keep = keep[keep > 0]  # label 0 is the background
    x, y = stats[keep, cv2.CC_STAT_LEFT], stats[keep, cv2.CC_STAT_TOP]
    order = np.lexsort((x, y, -peaks[keep]))[:max_boxes]  # last key sorts first: score desc, then y, x
    boxes = []
    for i in keep[order]:
        x0, y0, w, h = (int(v) for v in stats[i, :4])  # LEFT, TOP, WIDTH, HEIGHT
        boxes.append(Box(x0=x0, y0=y0, x1=x0 + w, y1=y0 + h, score=float(peaks[i]), label=label))
    return boxes


def _label_stats(labels: np.ndarray) -> np.ndarray:
    """(n, 5) int array laid out like OpenCV's component stats (LEFT, TOP, WIDTH, HEIGHT, AREA)."""
    n = int(labels.max()) + 1
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    x0, y0 = np.full(n, labels.shape[1]), np.full(n, labels.shape[0])
    x1, y1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
    np.minimum.at(x0, lab, xs)
    np.minimum.at(y0, lab, ys)
    np.maximum.at(x1, lab, xs + 1)
    np.maximum.at(y1, lab, ys + 1)
    area = np.bincount(lab, minlength=n)
    stats = np.stack([x0, y0, np.maximum(x1 - x0, 0), np.maximum(y1 - y0, 0), area], 1)
    stats[0] = (0, 0, labels.shape[1], labels.shape[0], labels.size - len(lab))
    return stats


def scale_boxes(boxes: Sequence[Box], sx: float, sy: float, width: int, height: int) -> list[Box]:
    """Boxes found on a map of another resolution, in the pixels of a (height, width) image."""
    return [Box(x0=int(np.floor(b.x0 * sx)), y0=int(np.floor(b.y0 * sy)),
                x1=min(width, int(np.ceil(b.x1 * sx))), y1=min(height, int(np.ceil(b.y1 * sy))),
                score=b.score, label=b.label) for b in boxes]


def box_iou(a: np.ndarray | Sequence, b: np.ndarray | Sequence) -> np.ndarray:
    """IoU matrix (N, M) between boxes a (N, 4) and b (M, 4) given as x0, y0, x1, y1, ends exclusive.

    Written with numpy because it is four lines of broadcasting; torchvision's version would add
    a dependency and a torch round trip. Zero-area boxes have IoU 0 with everything.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def boxes_at_levels(
    anomaly_map: np.ndarray,
    thresholds: Sequence[float],
    seed_fraction: float,
    min_area: int = 16,
    max_boxes: int = 32,
    label: str = "",
    overlap: float = LEVEL_OVERLAP,
) -> list[Box]:
    """`boxes_from_map` at several thresholds, strictest first, each split at cores
    (``t + seed_fraction * (1 - t)``). A box from a lower level joins only where it overlaps every
    box kept so far by IoU < `overlap`: a faint defect the strict level missed gets a box, a defect
    already boxed does not get a second, looser one. Sorted by score descending, cut to `max_boxes`.
    """
    kept: list[Box] = []
    for t in sorted(thresholds, reverse=True):
        found = boxes_from_map(anomaly_map, t, min_area=min_area, max_boxes=max_boxes, label=label,
                               seed_threshold=t + seed_fraction * (1.0 - t))
        if kept and found:
            iou = box_iou([(b.x0, b.y0, b.x1, b.y1) for b in found], [(b.x0, b.y0, b.x1, b.y1) for b in kept])
            found = [b for b, worst in zip(found, iou.max(axis=1)) if worst < overlap]
        kept += found
    kept.sort(key=lambda b: (-b.score, b.y0, b.x0))
    return kept[:max_boxes]


def peak_box(anomaly_map: np.ndarray, label: str = "") -> Box:
    """The box around the map's most anomalous spot: the 8-connected region holding the peak, of the pixels
    above half the way from the map's median to its peak. For an image judged defective whose map stays
    under the box levels (a faint defect, or one the image score saw and the map barely did) or crosses
    them only in regions too small to box, so that every defect verdict says where to look. Its score is
    the peak: below the pixel threshold unless such a small region holds it."""
    values = _check_map(anomaly_map).astype(np.float64, copy=False)
    valid = np.isfinite(values)
    if not valid.any():
        return Box(x0=0, y0=0, x1=values.shape[1], y1=values.shape[0], score=0.0, label=label)
    values = np.where(valid, values, -np.inf)  # NaN never joins the region
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    peak, median = float(values[y, x]), float(np.median(values[valid]))
    _, labels = cv2.connectedComponents((values >= median + PEAK_HALF * (peak - median)).astype(np.uint8),
                                        connectivity=8)
    ys, xs = np.nonzero(labels == labels[y, x])
    return Box(x0=int(xs.min()), y0=int(ys.min()), x1=int(xs.max()) + 1, y1=int(ys.max()) + 1, score=peak,
               label=label)
