"""Metrics against cases computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from lineinspect.training.metrics import (
    EvalAccumulator,
    accuracy,
    auroc_standard_error,
    average_precision,
    box_iou,
    box_recall,
    f1_at,
    f1_optimal_threshold,
    image_auroc,
    mean_average_precision,
    pixel_auroc,
    shrink_map_and_mask,
    threshold_for_false_reject_rate,
)
from lineinspect.vision.result import Box

# ---------------------------------------------------------------- AUROC


def test_image_auroc_perfect_inverted_tied_and_partial() -> None:
    labels = [0, 0, 1, 1]
    assert image_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert image_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert image_auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # every pair tied counts half
    # Pairs (defect, good): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert image_auroc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.75)


def test_image_auroc_one_class_is_an_error_not_nan() -> None:
    with pytest.raises(ValueError, match="both good and defect.*got 3 good and 0 defect"):
        image_auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, float("nan")], [0, 1])


def test_pixel_auroc_over_images_of_different_sizes() -> None:
    maps = [np.array([[0.9, 0.2], [0.1, 0.3]]), np.array([[0.25, 0.22, 0.05]])]
    masks = [np.array([[1, 0], [0, 0]], bool), np.array([[0, 1, 0]], bool)]
    # Defect pixels 0.9 and 0.22; good pixels 0.2, 0.1, 0.3, 0.25, 0.05.
    # 0.9 beats all 5; 0.22 beats 0.2, 0.1, 0.05 -> (5 + 3) / (2 * 5) = 0.8.
    assert pixel_auroc(maps, masks) == pytest.approx(0.8)


def test_pixel_auroc_subsampling_is_deterministic_and_bounded() -> None:
    rng = np.random.default_rng(1)
    masks = [rng.random((40, 40)) < 0.3 for _ in range(3)]
    noisy = [m * 0.5 + rng.random(m.shape) for m in masks]
    full = pixel_auroc(noisy, masks)
    sub = pixel_auroc(noisy, masks, max_pixels=1000, seed=0)
    assert sub == pixel_auroc(noisy, masks, max_pixels=1000, seed=0)
    assert sub != pixel_auroc(noisy, masks, max_pixels=1000, seed=1)
    assert abs(sub - full) < 0.05
    # A perfectly separating map stays perfect under any subsample.
    assert pixel_auroc([m.astype(float) for m in masks], masks, max_pixels=500) == 1.0


def test_pixel_auroc_rejects_shape_mismatch_and_one_class() -> None:
    with pytest.raises(ValueError, match="map 0 has shape"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 3), bool)])
    with pytest.raises(ValueError, match="pixel_auroc needs both"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 2), bool)])


# ---------------------------------------------------------------- thresholds and F1

SCORES = [0.1, 0.3, 0.35, 0.4, 0.8, 0.9]
LABELS = [0, 0, 1, 0, 1, 1]


def test_f1_optimal_threshold_by_hand() -> None:
    # threshold: predicted defects -> TP, FP -> P, R -> F1
    # 0.10: 6 -> 3, 3 -> 1/2, 1   -> 2/3
    # 0.30: 5 -> 3, 2 -> 3/5, 1   -> 3/4
    # 0.35: 4 -> 3, 1 -> 3/4, 1   -> 6/7  (best)
    # 0.40: 3 -> 2, 1 -> 2/3, 2/3 -> 2/3
    # 0.80: 2 -> 2, 0 -> 1,   2/3 -> 4/5
    # 0.90: 1 -> 1, 0 -> 1,   1/3 -> 1/2
    threshold, f1 = f1_optimal_threshold(SCORES, LABELS)
    assert threshold == 0.35
    assert f1 == pytest.approx(6 / 7)


def test_f1_at_matches_the_table() -> None:
    assert f1_at(SCORES, LABELS, 0.35) == pytest.approx(6 / 7)
    assert f1_at(SCORES, LABELS, 0.8) == pytest.approx(4 / 5)
    assert f1_at(SCORES, LABELS, 0.85) == pytest.approx(1 / 2)
    assert f1_at(SCORES, LABELS, 2.0) == 0.0  # nothing predicted


def test_f1_optimal_threshold_needs_a_defect() -> None:
    with pytest.raises(ValueError, match="at least one defect"):
        f1_optimal_threshold([0.1, 0.2], [0, 0])


def test_threshold_for_false_reject_rate() -> None:
    good = [0.5, 0.1, 0.9, 0.3, 0.7, 1.0, 0.2, 0.8, 0.4, 0.6]
    # 10 good, rate 0.2 -> at most 2 rejected: 0.9 and 1.0 (score >= 0.9).
    assert threshold_for_false_reject_rate(good, 0.2) == 0.9
    assert threshold_for_false_reject_rate(good, 0.25) == 0.9  # floor(2.5) = 2
    assert threshold_for_false_reject_rate(good, 0.3) == 0.8  # 3 rejected (float product 3.0000000000000004)
    # Rate 0: the threshold sits just above the highest good score, rejecting none.
    t0 = threshold_for_false_reject_rate(good, 0.0)
    assert t0 > 1.0 and t0 == np.nextafter(1.0, 2.0)
    # Ties: rejecting exactly 2 of [0.1, 0.5, 0.5, 0.5] would need to split the tie, so none is.
    t = threshold_for_false_reject_rate([0.1, 0.5, 0.5, 0.5], 0.5)
    assert t == np.nextafter(0.5, 1.0)
    with pytest.raises(ValueError, match="rate must be in"):
        threshold_for_false_reject_rate(good, 1.0)


def test_accuracy() -> None:
    assert accuracy(["scratch", "dent", "scratch"], ["scratch", "scratch", "scratch"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many predictions"):
        accuracy(["a"], [])


# ---------------------------------------------------------------- boxes


def test_box_iou_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 5, 10]])
    b = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [10, 0, 20, 10]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    # row 0: identical 1; 5x5 = 25 overlap / (100 + 100 - 25) = 1/7; touching edge (ends exclusive) 0
    # row 1: 50 inside 100 -> 1/2; overlap x 5..5 is empty -> 0; 0
    np.testing.assert_allclose(iou, [[1, 1 / 7, 0], [0.5, 0, 0]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    assert box_iou([[3, 3, 3, 8]], [[0, 0, 10, 10]])[0, 0] == 0.0  # zero-width box


def test_box_recall() -> None:
    preds = [np.array([[0, 0, 10, 5]]), np.array([[5, 5, 15, 15]])]
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 10, 10]])]
    # gt 1: IoU 50/100 = 0.5 hit; gt 2: no overlap; gt 3: IoU 1/7 ~ 0.14 < 0.3 -> 1/3.
    assert box_recall(preds, gts, iou=0.3) == pytest.approx(1 / 3)
    assert box_recall(preds, gts, iou=0.1) == pytest.approx(2 / 3)
    # Box objects work as well.
    assert box_recall([[Box(0, 0, 10, 10, 0.9)]], [[Box(0, 0, 10, 10, 1.0)]]) == 1.0
    with pytest.raises(ValueError, match="at least one ground-truth"):
        box_recall([[]], [[]])


def test_average_precision_with_a_false_positive_in_the_middle() -> None:
    gts = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]])]
    preds = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 30, 30]]), np.array([0.9, 0.8, 0.7]))]
    # Ranked: TP, FP, TP (the third has IoU 81/100).
    # precision 1, 1/2, 2/3; recall 1/2, 1/2, 1. Interpolated precision: 1 up to recall 1/2,
    # then 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision(preds, gts, iou=0.5) == pytest.approx(5 / 6)


def test_average_precision_duplicates_misses_and_images() -> None:
    gts = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]]), np.zeros((0, 4))]
    preds = [
        (np.array([[0, 0, 10, 10], [1, 0, 10, 10]]), np.array([0.6, 0.95])),  # duplicate on one gt
        (np.zeros((0, 4)), np.zeros(0)),  # second gt never found
        (np.array([[0, 0, 5, 5]]), np.array([0.7])),  # image without gt: a false positive
    ]
    # Ranked: 0.95 TP (IoU 0.9, takes gt), 0.7 FP, 0.6 FP (gt already taken).
    # precision 1, 1/2, 1/3; recall 1/2 throughout -> AP = 1/2 * 1 = 1/2.
    assert average_precision(preds, gts) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one ground-truth"):
        average_precision([(np.zeros((0, 4)), np.zeros(0))], [np.zeros((0, 4))])


def test_mean_average_precision_skips_classes_without_ground_truth() -> None:
    preds = [
        (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]), np.array([0.9, 0.8, 0.7]),
         ["scratch", "dent", "stain"]),
    ]
    gts = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70]]), ["scratch", "dent", "dent"])]
    # scratch: 1 gt, one TP -> AP 1. dent: 2 gts, one TP at rank 1 -> AP 1/2 * 1 = 1/2.
    # stain: no ground truth -> no AP, not in the mean. mAP = (1 + 1/2) / 2 = 3/4.
    result = mean_average_precision(preds, gts, ["scratch", "dent", "stain"])
    assert result["per_class"] == pytest.approx({"scratch": 1.0, "dent": 0.5})
    assert result["map"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"labels \['rust'\] are not in class_names"):
        mean_average_precision([(np.zeros((1, 4)), [0.5], ["rust"])], gts, ["scratch", "dent"])


# ---------------------------------------------------------------- accumulator


def test_shrink_map_and_mask_keeps_them_aligned() -> None:
    big = np.zeros((512, 300), np.float32)
    big[:256] = 0.9
    mask = np.zeros((512, 300), bool)
    mask[:256] = True
    small, small_mask = shrink_map_and_mask(big, mask, max_side=256)
    assert small.shape == small_mask.shape == (256, 150)
    assert small_mask.dtype == bool and small_mask[:128].all() and not small_mask[128:].any()
    np.testing.assert_allclose(small[:128], 0.9)
    np.testing.assert_allclose(small[128:], 0.0)
    same, none = shrink_map_and_mask(np.ones((10, 20)), None)
    assert same.shape == (10, 20) and same.dtype == np.float32 and none is None


def _map(top: float, bottom: float) -> np.ndarray:
    m = np.full((512, 300), bottom, np.float32)
    m[:256] = top
    return m


def test_accumulator_summary_by_hand() -> None:
    acc = EvalAccumulator()
    top_mask = _map(1, 0).astype(bool)
    acc.add(0.1, False, anomaly_map=_map(0.2, 0.2))
    acc.add(0.4, False, anomaly_map=_map(0.95, 0.95), pred_boxes=[Box(0, 0, 10, 10, 0.4, "scratch")])
    acc.add(0.35, True, anomaly_map=_map(0.9, 0.1), mask=top_mask, class_pred="scratch", class_true="scratch",
            pred_boxes=[Box(0, 0, 100, 90, 0.9, "scratch")], gt_boxes=[Box(0, 0, 100, 100, 1.0, "scratch")])
    acc.add(0.8, True, anomaly_map=_map(0.5, 0.5), class_pred="dent", class_true="scratch",
            pred_boxes=[Box(50, 50, 70, 70, 0.7, "dent")], gt_boxes=[Box(10, 10, 30, 30, 1.0, "dent")])
    summary = acc.summary()
    assert summary == pytest.approx({
        "n_images": 4,
        # scores 0.1, 0.4 good; 0.35, 0.8 defect -> 3 of 4 pairs ordered right.
        "image_auroc": 0.75,
        # Image 4 has no mask and is a defect -> left out; good images count as all-good pixels.
        # Stored at 256x150: defect pixels 19200 at 0.9; good: 19200 at 0.1, 38400 at 0.2,
        # 38400 at 0.95. 0.9 beats 57600 of 96000 -> 0.6.
        "pixel_auroc": 0.6,
        # thresholds 0.1 -> F1 2/3; 0.35 -> P 2/3 R 1 -> 4/5; 0.4 -> 1/2; 0.8 -> 2/3.
        "threshold": 0.35,
        "f1": 0.8,
        # at 0.35 the good part at 0.4 is rejected and no defect passes
        "goods_flagged": 1,
        "defects_missed": 0,
        "class_accuracy": 0.5,
        # scratch gt found (IoU 0.9), dent gt missed -> 1/2.
        "box_recall_iou03": 0.5,
        # scratch: 0.9 TP, 0.4 FP (good image) -> AP 1; dent: only a FP -> AP 0; mean 1/2.
        "map50": 0.5,
    })


def test_accumulator_leaves_out_what_cannot_be_computed() -> None:
    assert EvalAccumulator().summary() == {"n_images": 0}
    acc = EvalAccumulator(threshold=0.5)
    acc.add(0.2, False, anomaly_map=np.zeros((4, 4)))
    acc.add(0.7, False)
    assert acc.summary() == {"n_images": 2}  # no defect: no AUROC, F1, pixel or box metrics
    acc.add(0.6, True)
    # 0.6 beats 0.2, loses to 0.7 -> AUROC 1/2; at 0.5: 0.7 FP, 0.6 TP -> P 1/2, R 1 -> F1 2/3.
    assert acc.summary() == pytest.approx({"n_images": 3, "image_auroc": 0.5, "threshold": 0.5, "f1": 2 / 3,
                                           "goods_flagged": 1, "defects_missed": 0})
    acc.add(0.4, True)
    assert acc.summary()["defects_missed"] == 1
    with pytest.raises(ValueError, match="mask shape"):
        acc.add(0.1, False, anomaly_map=np.zeros((4, 4)), mask=np.zeros((4, 5), bool))


def test_auroc_standard_error_by_hand_and_with_the_number_of_images() -> None:
    # Hanley & McNeil at A = 0.965, 20 + 20: Q1 = 0.9324, Q2 = 0.9478,
    # var = (0.0338 + 19 * 0.00121 + 19 * 0.01658) / 400 = 0.000930 -> 0.0305
    assert auroc_standard_error(0.965, 20, 20) == pytest.approx(0.0305, abs=5e-4)
    assert auroc_standard_error(0.965, 200, 200) < 0.4 * auroc_standard_error(0.965, 20, 20)
    assert auroc_standard_error(1.0, 20, 20) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        auroc_standard_error(0.9, 0, 20)
