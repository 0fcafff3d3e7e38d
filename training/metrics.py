"""Evaluation metrics: pure functions on numpy arrays, plus one small accumulator.

Conventions: label True (1) means defect; a score ``>= threshold`` means "reject as defect";
boxes are x0, y0, x1, y1 with exclusive ends (as `lineinspect.vision.result.Box`). A metric
that is undefined on the given data raises ValueError instead of returning NaN; the
accumulator leaves such metrics out of its summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, roc_auc_score

from lineinspect.vision.postprocess import box_iou
from lineinspect.vision.result import Box

__all__ = [
    "EvalAccumulator",
    "accuracy",
    "average_precision",
    "box_iou",
    "box_recall",
    "boxes_as_arrays",
    "f1_at",
    "f1_optimal_threshold",
    "image_auroc",
    "mean_average_precision",
    "pixel_auroc",
    "shrink_map_and_mask",
    "threshold_for_false_reject_rate",
]


# ---------------------------------------------------------------- image-level


def _scores_labels(
    scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size == 0 or s.size != y.size:
        raise ValueError(f"need as many scores as labels (and at least one); got {s.size} and {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} NaN/inf values")
    return s, y


def _need_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"{what} needs both good and defect samples; got {y.size - n_pos} good and {n_pos} defect"
        )


def image_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray) -> float:
    """Area under the ROC curve of image scores (ties count half)."""
    s, y = _scores_labels(scores, labels)
    _need_both_classes(y, "image_auroc")
    return float(roc_auc_score(y, s))


def auroc_standard_error(auroc: float, n_defect: int, n_good: int) -> float:
    """Standard error of an AUROC measured on `n_defect` and `n_good` images (Hanley & McNeil, 1982):
    how far a second set of that size could put it. scikit-learn has no such estimate."""
    if n_defect < 1 or n_good < 1:
        raise ValueError("an AUROC's standard error needs at least one defect and one good image")
    a = min(max(auroc, 0.0), 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_defect - 1) * (q1 - a * a) + (n_good - 1) * (q2 - a * a)) / (n_defect * n_good)
    return float(np.sqrt(max(var, 0.0)))


def pixel_auroc(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    max_pixels: int = 2_000_000,
    seed: int = 0,
) -> float:
    """ROC AUC over all pixels of (H, W) anomaly maps against their bool defect masks.

    Images may differ in size. When there are more than `max_pixels` pixels in total, exactly
    `max_pixels` are drawn uniformly without replacement (seeded, so repeatable) and gathered
    image by image, so the full concatenation is never built.
    """
    if len(maps) != len(masks) or len(maps) == 0:
        raise ValueError(f"need as many maps as masks (and at least one); got {len(maps)} and {len(masks)}")
    for i, (m, k) in enumerate(zip(maps, masks, strict=True)):
        if np.ndim(m) != 2 or np.shape(m) != np.shape(k):
            raise ValueError(f"map {i} has shape {np.shape(m)} but its mask {np.shape(k)}; "
                             "both must be the same (H, W)")
    sizes = np.array([np.size(m) for m in maps], dtype=np.int64)
    total = int(sizes.sum())
    if total > max_pixels:
        picks = np.sort(np.random.default_rng(seed).choice(total, size=max_pixels, replace=False))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        cuts = np.searchsorted(picks, bounds)  # picks[cuts[i]:cuts[i+1]] fall in image i
        s_parts, y_parts = [], []
        for i, (m, k) in enumerate(zip(maps, masks, strict=True)):
            local = picks[cuts[i] : cuts[i + 1]] - bounds[i]  # flat indices inside image i
            s_parts.append(np.asarray(m, np.float64).ravel()[local])
            y_parts.append(np.asarray(k, bool).ravel()[local])
        s, y = np.concatenate(s_parts), np.concatenate(y_parts)
    else:
        s = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
        y = np.concatenate([np.asarray(k, bool).ravel() for k in masks])
    s, y = _scores_labels(s, y)
    _need_both_classes(y, "pixel_auroc")
    return float(roc_auc_score(y, s))


def f1_optimal_threshold(
    scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray
) -> tuple[float, float]:
    """(threshold, f1) maximising F1 of the rule ``score >= threshold``; the threshold is one of the
    scores. Among equal F1 the lowest threshold wins (the first one on sklearn's increasing list)."""
    s, y = _scores_labels(scores, labels)
    if not y.any():
        raise ValueError("f1_optimal_threshold needs at least one defect sample; got only good ones")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[: len(thresholds)], recall[: len(thresholds)]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def threshold_for_false_reject_rate(good_scores: Sequence[float] | np.ndarray, rate: float) -> float:
    """Threshold rejecting at most ``floor(rate * n)`` of the n good scores under ``score >= threshold``.

    With k allowed rejections, the (k+1)-th largest good score v must pass, so the threshold is
    the smallest good score above v (exactly the scores above v are rejected), or the next float
    above v when none is larger (ties at v make rejecting exactly k impossible; fewer are).
    """
    s = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("threshold_for_false_reject_rate needs at least one good score")
    if not np.all(np.isfinite(s)):
        raise ValueError("good_scores contain NaN/inf values")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    k = math.floor(rate * s.size + 1e-9)  # the epsilon keeps 0.29 * 100 at 29, not 28
    v = s[s.size - k - 1]
    above = s[s > v]
    return float(above[0]) if above.size else float(np.nextafter(v, np.inf))


def f1_at(scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray, threshold: float) -> float:
    """F1 of the rule ``score >= threshold`` (0 when nothing is predicted or present)."""
    s, y = _scores_labels(scores, labels)
    return float(f1_score(y, s >= threshold, zero_division=0.0))


def accuracy(pred: Sequence | np.ndarray, true: Sequence | np.ndarray) -> float:
    """Fraction of equal entries (class names or ids)."""
    if len(pred) != len(true) or len(pred) == 0:
        raise ValueError(
            f"need as many predictions as truths (and at least one); got {len(pred)} and {len(true)}"
        )
    return float(accuracy_score(list(true), list(pred)))


# ---------------------------------------------------------------- boxes


def _xyxy(boxes: np.ndarray | Sequence) -> np.ndarray:
    """(K, 4) float array from an array-like of boxes or a sequence of `Box`."""
    if len(boxes) and isinstance(boxes[0], Box):
        return np.array([(b.x0, b.y0, b.x1, b.y1) for b in boxes], dtype=np.float64)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def boxes_as_arrays(boxes: Sequence[Box]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`Box` list -> (xyxy (K, 4) float, scores (K,), labels)."""
    return _xyxy(boxes), np.array([b.score for b in boxes], dtype=np.float64), [b.label for b in boxes]


def box_recall(
    pred_boxes_per_image: Sequence[np.ndarray | Sequence],
    gt_boxes_per_image: Sequence[np.ndarray | Sequence],
    iou: float = 0.3,
) -> float:
    """Fraction of ground-truth boxes that some predicted box of the same image overlaps with
    IoU >= `iou` (no one-to-one matching: one large box may cover several small ones)."""
    if len(pred_boxes_per_image) != len(gt_boxes_per_image):
        raise ValueError(
            f"{len(pred_boxes_per_image)} images of predictions but {len(gt_boxes_per_image)} of truth"
        )
    hit = total = 0
    for pred, gt in zip(pred_boxes_per_image, gt_boxes_per_image, strict=True):
        g = _xyxy(gt)
        total += len(g)
        p = _xyxy(pred)
        if len(g) and len(p):
            hit += int(np.sum(box_iou(p, g).max(axis=0) >= iou))
    if total == 0:
        raise ValueError("box_recall needs at least one ground-truth box")
    return hit / total


def average_precision(
    preds: Sequence[tuple[np.ndarray | Sequence, np.ndarray | Sequence]],
    gts: Sequence[np.ndarray | Sequence],
    iou: float = 0.5,
) -> float:
    """VOC-style AP (all-point interpolation) of one class.

    preds: per image (boxes (K, 4), scores (K,)); gts: per image boxes (G, 4). Detections of all
    images are ranked by score (stable: image order, then box order breaks ties). A detection is
    a hit when its best-overlapping ground truth in the same image has IoU >= `iou` and was not
    taken by a higher-scored detection (VOC rule: no fall-back to the second-best overlap).

    Written by hand: scikit-learn's average_precision_score has no box matching, and the COCO
    tools use 101-point interpolation and are not a dependency here.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} images of predictions but {len(gts)} of truth")
    gt_arrays = [_xyxy(g) for g in gts]
    n_gt = sum(len(g) for g in gt_arrays)
    if n_gt == 0:
        raise ValueError("average_precision needs at least one ground-truth box")
    dets = []  # (score, image, box)
    for img, (boxes, scores) in enumerate(preds):
        b, s = _xyxy(boxes), np.asarray(scores, dtype=np.float64).ravel()
        if len(b) != len(s):
            raise ValueError(f"image {img}: {len(b)} predicted boxes but {len(s)} scores")
        dets.extend((float(s[j]), img, b[j]) for j in range(len(b)))
    if not dets:
        return 0.0
    dets.sort(key=lambda d: -d[0])  # sort is stable
    taken = [np.zeros(len(g), dtype=bool) for g in gt_arrays]
    tp = np.zeros(len(dets))
    for d, (_, img, box) in enumerate(dets):
        g = gt_arrays[img]
        if len(g) == 0:
            continue
        ious = box_iou(box, g)[0]
        best = int(np.argmax(ious))
        if ious[best] >= iou and not taken[img][best]:
            taken[img][best] = True
            tp[d] = 1.0
    cum_tp = np.cumsum(tp)
    recall = cum_tp / n_gt
    precision = cum_tp / np.arange(1, len(dets) + 1)
    # Interpolate: precision at recall r is the best precision at any recall >= r.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * envelope))


def mean_average_precision(
    preds_with_labels: Sequence[tuple[np.ndarray | Sequence, np.ndarray | Sequence, Sequence[str]]],
    gts_with_labels: Sequence[tuple[np.ndarray | Sequence, Sequence[str]]],
    class_names: Sequence[str],
    iou: float = 0.5,
) -> dict:
    """Per-class VOC AP and their mean: ``{"per_class": {name: ap}, "map": mean}``.

    preds_with_labels: per image (boxes (K, 4), scores (K,), labels (K,)); gts_with_labels: per
    image (boxes (G, 4), labels (G,)). Classes without ground truth have no AP and are left out
    of both entries (their detections still cannot help another class).
    """
    if len(preds_with_labels) != len(gts_with_labels):
        raise ValueError(
            f"{len(preds_with_labels)} images of predictions but {len(gts_with_labels)} of truth"
        )
    known = set(class_names)
    label_lists = (("prediction", [p[2] for p in preds_with_labels]),
                   ("ground truth", [g[1] for g in gts_with_labels]))
    for kind, items in label_lists:
        for img, labels in enumerate(items):
            unknown = set(labels) - known
            if unknown:
                raise ValueError(
                    f"image {img}: {kind} labels {sorted(unknown)} are not in class_names {list(class_names)}"
                )
    per_class = {}
    for name in class_names:
        preds, gts = [], []
        for (pb, ps, pl), (gb, gl) in zip(preds_with_labels, gts_with_labels, strict=True):
            pb, ps = _xyxy(pb), np.asarray(ps, dtype=np.float64).ravel()
            pm = np.array([lab == name for lab in pl], dtype=bool)
            gm = np.array([lab == name for lab in gl], dtype=bool)
            preds.append((pb[pm] if len(pm) else pb[:0], ps[pm] if len(pm) else ps[:0]))
            gts.append(_xyxy(gb)[gm] if len(gm) else _xyxy(gb)[:0])
        if sum(len(g) for g in gts):
            per_class[name] = average_precision(preds, gts, iou)
    if not per_class:
        raise ValueError(f"mean_average_precision: no ground-truth box of any class in {list(class_names)}")
    return {"per_class": per_class, "map": float(np.mean(list(per_class.values())))}


# ---------------------------------------------------------------- accumulator


def shrink_map_and_mask(
    anomaly_map: np.ndarray, mask: np.ndarray | None, max_side: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """Shrink an (H, W) map (area averaging, float32) and its mask (nearest, bool) together so the
    longer side is at most `max_side`; smaller pairs come back unchanged in size."""
    h, w = anomaly_map.shape
    anomaly_map = anomaly_map.astype(np.float32)
    mask = None if mask is None else np.asarray(mask).astype(bool)
    scale = max_side / max(h, w)
    if scale >= 1:
        return anomaly_map, mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    small = cv2.resize(anomaly_map, size, interpolation=cv2.INTER_AREA)
    if mask is not None:
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return small, mask


@dataclass
class _Image:
    score: float
    label: bool
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None
    class_pred: str | None
    class_true: str | None
    pred_boxes: list[Box] | None
    gt_boxes: list[Box] | None


class EvalAccumulator:
    """Collects per-image results during evaluation; `summary()` computes what the data allows.

    Maps and masks are stored shrunk to at most `max_map_side` pixels per side (map by area
    averaging, mask by nearest neighbour) so a run over large images keeps bounded memory.
    A good image given a map but no mask counts as all-good pixels, and one given no ground-truth
    boxes as having none; a defect image without mask or boxes is left out of those metrics.
    """

    def __init__(self, threshold: float | None = None, max_map_side: int = 256) -> None:
        self.threshold = threshold  # None: report the F1-optimal threshold
        self.max_map_side = max_map_side
        self._images: list[_Image] = []

    def __len__(self) -> int:
        return len(self._images)

    def add(
        self,
        score: float,
        label: bool,
        anomaly_map: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        class_pred: str | None = None,
        class_true: str | None = None,
        pred_boxes: Sequence[Box] | None = None,
        gt_boxes: Sequence[Box] | None = None,
    ) -> None:
        """Record one image. `pred_boxes` carry score and label; `gt_boxes` their label (score unused)."""
        if mask is not None and anomaly_map is None:
            raise ValueError("a mask was given without an anomaly_map to compare it with")
        if anomaly_map is not None:
            anomaly_map = np.asarray(anomaly_map)
            if anomaly_map.ndim != 2:
                raise ValueError(f"anomaly_map must be (H, W), got shape {anomaly_map.shape}")
            if mask is not None and np.shape(mask) != anomaly_map.shape:
                raise ValueError(
                    f"mask shape {np.shape(mask)} differs from anomaly_map shape {anomaly_map.shape}"
                )
            anomaly_map, mask = shrink_map_and_mask(anomaly_map, None if mask is None else np.asarray(mask),
                                                     self.max_map_side)
        self._images.append(_Image(
            float(score), bool(label), anomaly_map, mask, class_pred or None, class_true or None,
            None if pred_boxes is None else list(pred_boxes), None if gt_boxes is None else list(gt_boxes),
        ))

    def summary(self) -> dict:
        """Metrics computable from what was added; keys absent when a metric is undefined."""
        imgs = self._images
        out: dict = {"n_images": len(imgs)}
        if not imgs:
            return out
        scores = np.array([im.score for im in imgs])
        labels = np.array([im.label for im in imgs], dtype=bool)
        n_def = int(labels.sum())
        if 0 < n_def < len(imgs):
            out["image_auroc"] = image_auroc(scores, labels)

        pairs = [(im.anomaly_map, im.mask if im.mask is not None else np.zeros(im.anomaly_map.shape, bool))
                 for im in imgs if im.anomaly_map is not None and (im.mask is not None or not im.label)]
        if any(im.mask is not None for im in imgs):
            n_pos = sum(int(k.sum()) for _, k in pairs)
            if 0 < n_pos < sum(k.size for _, k in pairs):
                out["pixel_auroc"] = pixel_auroc([m for m, _ in pairs], [k for _, k in pairs])

        if n_def:
            if self.threshold is None:
                out["threshold"], out["f1"] = f1_optimal_threshold(scores, labels)
            else:
                out["threshold"], out["f1"] = float(self.threshold), f1_at(scores, labels, self.threshold)
            flagged = scores >= out["threshold"]
            out["defects_missed"] = int((~flagged & labels).sum())  # of n_def, passed as good
            if n_def < len(imgs):
                out["goods_flagged"] = int((flagged & ~labels).sum())  # of the good parts, rejected

        known = [im for im in imgs if im.label and im.class_true is not None and im.class_pred is not None]
        if known:
            out["class_accuracy"] = accuracy([im.class_pred for im in known], [im.class_true for im in known])

        boxed = [im for im in imgs if im.gt_boxes is not None or not im.label]
        gts = [im.gt_boxes or [] for im in boxed]
        if any(im.gt_boxes is not None for im in imgs) and sum(len(g) for g in gts):
            preds = [im.pred_boxes or [] for im in boxed]
            out["box_recall_iou03"] = box_recall(preds, gts, iou=0.3)
            names = sorted({b.label for g in gts for b in g} | {b.label for p in preds for b in p})
            out["map50"] = mean_average_precision(
                [boxes_as_arrays(p) for p in preds],
                [(_xyxy(g), [b.label for b in g]) for g in gts],
                names, iou=0.5,
            )["map"]
        return out
