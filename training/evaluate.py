"""Measure a model on data it did not train on: the test split of a dataset."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from lineinspect.errors import LineInspectError
from lineinspect.training.datasets import Dataset, Sample
from lineinspect.training.metrics import EvalAccumulator, image_auroc, pixel_auroc
from lineinspect.vision.inspector import Inspector, calibrated_map, calibrated_score
from lineinspect.vision.preprocess import to_batch
from lineinspect.vision.result import Box


def gt_boxes(sample: Sample) -> list[Box]:
    return [Box(*map(int, b), score=1.0, label=lab) for b, lab in zip(sample.boxes, sample.box_labels)]


def evaluate(inspector: Inspector, dataset: Dataset, batch_size: int = 16, latency_samples: int = 40) -> dict:
    """Image/pixel AUROC, F1 at the model's threshold, class accuracy, boxes, fast-path latency."""
    samples = dataset.test
    if not samples:
        raise LineInspectError(f"{dataset.root}: no test images to evaluate on (expected test/ or a VOC split)")
    acc = EvalAccumulator(threshold=inspector.threshold)
    use_boxes = dataset.layout == "voc"
    per_type: dict[str, list] = defaultdict(list)  # type -> [(score, map, mask)]
    goods: list = []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluating", unit="batch", leave=False, disable=None):
        chunk = samples[start : start + batch_size]
        images = [s.load_image() for s in chunk]
        results = inspector.inspect_batch(images, heatmaps=True)
        for s, image, r in zip(chunk, images, results):
            mask = s.load_mask(image.shape[:2])
            known_class = s.label if s.is_defect and s.label in inspector.class_names else None
            acc.add(r.score, s.is_defect, r.heatmap, mask,
                    # A defect image judged good counts as a wrong class: it is a miss.
                    class_pred=(r.defect_class or "<good>") if known_class else None,
                    class_true=known_class,
                    pred_boxes=r.boxes if use_boxes else None,
                    gt_boxes=gt_boxes(s) if use_boxes else None)
            entry = (r.score, r.heatmap, mask)
            (per_type[s.label] if s.is_defect else goods).append(entry)
    summary = acc.summary()
    summary["per_type"] = _per_type(per_type, goods)
    summary["latency_ms_p50"], summary["latency_ms_p99"] = _latency(inspector, samples, latency_samples)
    summary["threshold"] = inspector.threshold
    summary["score_source"] = inspector.calibration.score_source
    summary["map_source"] = inspector.calibration.map_source
    return summary


def compare_models(reference: Inspector, candidate: Inspector, samples: list[Sample], batch_size: int = 16) -> dict:
    """How far `candidate` (e.g. the int8 model) moves from `reference` (fp32) on the same images:
    image scores, verdicts at each model's threshold, Pearson correlation of the model-resolution
    served maps, and image AUROC of both when the samples hold good and defect images."""
    ref_scores, cand_scores, corr = [], [], []
    for start in range(0, len(samples), batch_size):
        images = [s.load_image() for s in samples[start : start + batch_size]]
        outs = []
        for insp in (reference, candidate):
            out = insp.run_model(to_batch(images, insp.input_size, insp.device))
            outs.append((calibrated_score(out, insp.calibration).float().cpu().numpy(),
                         calibrated_map(out, insp.calibration).flatten(1).cpu().numpy()))
        (rs, rm), (cs, cm) = outs
        ref_scores += rs.tolist()
        cand_scores += cs.tolist()
        corr += [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(rm, cm)]
    r, c = np.array(ref_scores), np.array(cand_scores)
    diff = np.abs(c - r)
    summary = {"n_images": len(r), "score_abs_diff_mean": round(float(diff.mean()), 5),
               "score_abs_diff_max": round(float(diff.max()), 5),
               "verdict_flips": int(((r >= reference.threshold) != (c >= candidate.threshold)).sum()),
               "map_correlation_mean": round(float(np.nanmean(corr)), 5),
               "map_correlation_min": round(float(np.nanmin(corr)), 5)}
    labels = [s.is_defect for s in samples]
    if 0 < sum(labels) < len(labels):
        summary["image_auroc"] = {"reference": round(image_auroc(r, labels), 4),
                                  "candidate": round(image_auroc(c, labels), 4)}
    return summary


def _per_type(per_type: dict, goods: list) -> dict:
    out = {}
    for kind, items in sorted(per_type.items()):
        row: dict = {"n": len(items)}
        if goods:
            scores = [e[0] for e in goods] + [e[0] for e in items]
            labels = [0] * len(goods) + [1] * len(items)
            row["image_auroc"] = round(image_auroc(scores, labels), 4)
        with_masks = [e for e in items if e[2] is not None and e[2].any()]
        if with_masks:
            maps = [e[1] for e in with_masks] + [e[1] for e in goods[:20]]
            masks = [e[2] for e in with_masks] + [np.zeros(e[1].shape, bool) for e in goods[:20]]
            row["pixel_auroc"] = round(pixel_auroc(maps, masks, max_pixels=500_000), 4)
        out[kind] = row
    return out


def _latency(inspector: Inspector, samples: list[Sample], n: int) -> tuple[float, float]:
    """Fast-path latency per image at batch 1 (decode excluded, model + post-processing included)."""
    images = [s.load_image() for s in samples[: n + 3]]
    times = []
    for i, image in enumerate(images):
        t = time.perf_counter()
        inspector.inspect_batch([image])
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - t) * 1000)
    return round(float(np.percentile(times, 50)), 2), round(float(np.percentile(times, 99)), 2)
