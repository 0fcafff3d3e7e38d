"""Box levels chosen on labelled validation boxes, and labelled boxes carried into the image cache."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lineinspect.training.box_calibration import box_quality, choose_box_levels
from lineinspect.training.data_cache import load_cache
from lineinspect.training.datasets import Sample


def _maps() -> tuple[np.ndarray, list[np.ndarray]]:
    """Eight 40x40 maps, each with a strong defect and a faint one, both labelled."""
    maps = np.zeros((8, 40, 40), np.float32)
    maps[:, 4:14, 4:14] = 0.9
    maps[:, 25:33, 20:30] = 0.35
    boxes = [np.array([[4, 4, 14, 14], [20, 25, 30, 33]], np.float64)] * 8
    return maps, boxes


def test_the_faint_defect_gets_a_box_from_a_looser_second_level() -> None:
    maps, boxes = _maps()
    strict_only = box_quality(maps, boxes, [0.5], seed_fraction=0.45, min_area=4)
    assert strict_only[0] == 0.5  # the pixel-F1 level alone misses every faint defect
    fields, notes = choose_box_levels(maps, boxes, pixel_threshold=0.5, min_area=4)
    assert fields["box_lower_threshold"] is not None and fields["box_lower_threshold"] < 0.35
    assert fields["pixel_threshold"] > 0.35  # the faint one is boxed by the second level, not a lower main one
    assert notes["val_box_recall_iou30"] == 1.0 and notes["val_box_ap_iou50"] == 1.0
    assert notes["pixel_f1_threshold"] == 0.5


def test_cache_holds_labelled_boxes_in_its_own_pixels(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.full((40, 80, 3), 128, np.uint8))  # 80 wide, 40 high
    sample = Sample(path=path, label="pit", boxes=[(8, 4, 40, 20)], box_labels=["pit"])
    good = Sample(path=path, label="good")
    cache = load_cache([sample, good], size=32, class_names=["pit"])
    np.testing.assert_allclose(cache.boxes[0], [[3.2, 3.2, 16.0, 16.0]])
    assert cache.boxes[1].shape == (0, 4)
    assert [len(b) for b in cache.subset([1, 0]).boxes] == [0, 1]
