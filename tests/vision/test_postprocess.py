"""Heatmap post-processing on small synthetic maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from lineinspect.vision.postprocess import (
    box_iou,
    boxes_at_levels,
    boxes_from_map,
    peak_box,
    scale_boxes,
    smooth_map,
    upsample_map,
)
from lineinspect.vision.result import Box


def _two_blobs() -> np.ndarray:
    m = np.zeros((40, 50), np.float32)
    m[5:10, 10:18] = 0.6  # blob A: rows 5..9, cols 10..17, 40 px, peak 0.7
    m[7, 12] = 0.7
    m[20:30, 30:40] = 0.8  # blob B: rows 20..29, cols 30..39, 100 px, peak 0.95
    m[25, 33] = 0.95
    m[35:37, 2:4] = 0.99  # 4 px speck: the highest value, but below min_area
    return m


def test_boxes_from_map_two_blobs_exact() -> None:
    boxes = boxes_from_map(_two_blobs(), threshold=0.5, min_area=16, label="scratch")
    assert [(b.x0, b.y0, b.x1, b.y1, b.label) for b in boxes] == [
        (30, 20, 40, 30, "scratch"),  # higher peak first
        (10, 5, 18, 10, "scratch"),
    ]
    assert boxes[0].score == pytest.approx(0.95, abs=1e-6)
    assert boxes[1].score == pytest.approx(0.7, abs=1e-6)


def test_boxes_from_map_min_area_max_boxes_and_threshold() -> None:
    m = _two_blobs()
    small = boxes_from_map(m, threshold=0.5, min_area=1)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in small][0] == (2, 35, 4, 37)  # the speck leads at 0.99
    assert len(small) == 3
    assert len(boxes_from_map(m, threshold=0.5, max_boxes=1)) == 1
    assert boxes_from_map(m, threshold=1.0) == []
    # Threshold 0.7 keeps B whole (0.8) and only A's single peak pixel, which is too small.
    only_b = boxes_from_map(m, threshold=0.7)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in only_b] == [(30, 20, 40, 30)]


def test_boxes_from_map_joins_diagonal_neighbours_and_scores_by_region() -> None:
    m = np.zeros((20, 20))
    m[2:6, 2:6] = 0.5  # 16 px
    m[6:10, 6:10] = 0.9  # touches the first block only at a corner: 8-connected, one region
    boxes = boxes_from_map(m, threshold=0.5)
    assert [(b.x0, b.y0, b.x1, b.y1, b.score) for b in boxes] == [(2, 2, 10, 10, 0.9)]


def test_upsample_map_bilinear_values() -> None:
    # OpenCV samples at pixel centres: x_src = (x + 0.5) / 2 - 0.5 -> -0.25, 0.25, 0.75, 1.25 (edges clamp).
    out = upsample_map(np.array([[0.0, 1.0]]), height=3, width=4)
    assert out.shape == (3, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0.25, 0.75, 1.0]] * 3)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        upsample_map(np.zeros((2, 2, 3)), 4, 4)


def test_smooth_map_spreads_an_impulse_and_keeps_its_mass() -> None:
    m = np.zeros((41, 41))
    m[20, 20] = 1.0
    out = smooth_map(m, sigma_px=2.0)
    assert out.dtype == np.float32
    assert out.sum() == pytest.approx(1.0, abs=1e-4)
    # Peak of a sampled 2-D Gaussian with sigma 2: about 1 / (2 pi sigma^2) = 0.0398.
    assert out[20, 20] == pytest.approx(1 / (2 * np.pi * 4), rel=0.02)
    assert out[20, 18] == pytest.approx(out[18, 20]) and out[20, 18] == pytest.approx(out[20, 22])
    np.testing.assert_array_equal(smooth_map(m, 0), m)


def test_box_iou_is_shared_with_metrics() -> None:
    assert box_iou([[0, 0, 10, 10]], [[5, 5, 15, 15]])[0, 0] == pytest.approx(25 / 175)


def test_lower_level_adds_only_the_faint_defect() -> None:
    m = np.zeros((40, 60), np.float32)
    m[5:15, 5:15] = 0.9  # a strong defect, its soft rim at 0.35
    m[3:17, 3:17] = np.maximum(m[3:17, 3:17], 0.35)
    m[25:33, 40:50] = 0.4  # a faint one
    strict = boxes_at_levels(m, [0.6], seed_fraction=0.45, min_area=4)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in strict] == [(5, 5, 15, 15)]
    both = boxes_at_levels(m, [0.3, 0.6], seed_fraction=0.45, min_area=4, label="x")
    # the strong one keeps its strict box (its looser 3..17 box is the same defect); the faint one joins
    assert [(b.x0, b.y0, b.x1, b.y1, b.label) for b in both] == [(5, 5, 15, 15, "x"), (40, 25, 50, 33, "x")]
    assert both[1].score == pytest.approx(0.4)
    assert boxes_at_levels(m, [0.3, 0.6], seed_fraction=0.45, min_area=4, max_boxes=1, label="x") == both[:1]


def test_touching_defects_split_at_their_cores() -> None:
    m = np.zeros((40, 60), np.float32)
    m[5:15, 5:30] = 0.6  # one region at the pixel threshold ...
    m[8:12, 8:12] = 0.9  # ... holding two separate cores
    m[8:12, 22:26] = 0.95
    m[30:35, 40:50] = 0.55  # a region with no core keeps one box
    plain = boxes_from_map(m, 0.5, min_area=4)
    assert [(b.x0, b.x1) for b in plain] == [(5, 30), (40, 50)]
    split = boxes_from_map(m, 0.5, min_area=4, seed_threshold=0.8)
    assert [(b.x0, b.y0, b.x1, b.y1, b.score) for b in split] == [
        (17, 5, 30, 15, pytest.approx(0.95)), (5, 5, 17, 15, pytest.approx(0.9)), (40, 30, 50, 35, pytest.approx(0.55)),
    ]
    # Every pixel of the region is boxed exactly once: the two halves tile it.
    assert sum((b.x1 - b.x0) * (b.y1 - b.y0) for b in split[:2]) == 25 * 10


def test_a_core_never_claims_pixels_of_another_region() -> None:
    m = np.zeros((20, 40), np.float32)
    m[5:10, 2:10] = 0.9  # a region with a core
    m[5:10, 14:20] = 0.6  # a separate region without one, nearer to that core than to anything else
    boxes = boxes_from_map(m, 0.5, min_area=4, seed_threshold=0.8)
    assert sorted((b.x0, b.x1) for b in boxes) == [(2, 10), (14, 20)]


def test_scale_boxes_to_input_pixels_stays_inside() -> None:
    boxes = [Box(0, 10, 64, 20, score=0.9, label="hole")]
    (b,) = scale_boxes(boxes, 640 / 64, 480 / 64, 640, 480)
    assert (b.x0, b.y0, b.x1, b.y1, b.label) == (0, 75, 640, 150, "hole")


def test_peak_box_covers_the_peaks_region_and_nothing_else() -> None:
    m = np.full((20, 30), 0.1)
    m[5:9, 10:14] = 0.3  # a faint spot under any pixel threshold
    m[6, 11] = 0.35
    m[15, 2] = 0.2  # a weaker one elsewhere, below half the way to the peak
    m[0, 0] = np.nan
    assert peak_box(m, "scratch") == Box(x0=10, y0=5, x1=14, y1=9, score=0.35, label="scratch")
    flat = np.full((4, 6), 0.2)  # nothing stands out: the whole image
    assert peak_box(flat) == Box(x0=0, y0=0, x1=6, y1=4, score=0.2)
    assert peak_box(np.full((3, 3), np.nan)).score == 0.0
