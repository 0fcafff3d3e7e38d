"""Overlay rendering: shapes, colours we can compute by hand, and that boxes show up."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lineinspect.service.overlay import render_overlay, thumbnail
from lineinspect.vision.result import Box


def _grey(h: int = 120, w: int = 160, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _body(out: np.ndarray, h: int) -> np.ndarray:
    """The image part of an overlay (the header bar is stacked above it)."""
    return out[out.shape[0] - h:]


def test_shape_dtype_and_header_bar() -> None:
    image = _grey()
    out = render_overlay(image, None, [], "good  score 0.12", defect=False)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[1:] == (160, 3)
    bar_h = out.shape[0] - 120
    assert 10 <= bar_h <= 60
    np.testing.assert_array_equal(_body(out, 120), image)  # nothing drawn on the image itself
    bar = out[:bar_h]
    assert tuple(bar[0, 0]) == (30, 140, 60)  # green bar for a good verdict
    assert (bar == 255).all(axis=2).any()  # white text was written
    red = render_overlay(image, None, [], "defect", defect=True)
    assert tuple(red[0, 0]) == (200, 30, 30)


def test_heatmap_blend_values() -> None:
    image = _grey()
    heat = np.zeros((120, 160), np.float32)
    heat[:, 80:] = 1.0
    body = _body(render_overlay(image, heat, [], "x"), 120)
    np.testing.assert_array_equal(body[:, :80], image[:, :80])  # zero heat leaves pixels untouched
    # JET at 1.0 is RGB (128, 0, 0): 0.6 * 100 + 0.4 * 128 = 111.2 -> 111; 0.6 * 100 = 60.
    jet_top = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    assert tuple(jet_top) == (128, 0, 0)
    assert (body[:, 80:] == (111, 60, 60)).all()


def test_heatmap_at_model_resolution_is_resized() -> None:
    heat = np.ones((14, 14), np.float32)
    body = _body(render_overlay(_grey(), heat, [], "x"), 120)
    assert (body == (111, 60, 60)).all()
    with pytest.raises(ValueError, match="heatmap must be"):
        render_overlay(_grey(), np.ones((2, 2, 2)), [], "x")


def test_boxes_change_pixels_on_their_outline_only() -> None:
    image = _grey()
    plain = _body(render_overlay(image, None, [], "defect"), 120)
    boxed = _body(render_overlay(image, None, [Box(40, 50, 100, 110, 0.87, "scratch")], "defect"), 120)
    changed = (plain != boxed).any(axis=2)
    assert changed[50:110, 40].all() and changed[50:110, 99].all()  # left and right edges (x1 exclusive)
    assert changed[109, 40:100].all()  # bottom edge, last row inside the box
    assert not changed[80, 70]  # inside the box stays as it was
    assert not changed[:, 110:].any()  # right of the box nothing changes
    assert changed[30:50, 40:100].any()  # the "scratch 0.87" tag sits above the box


@pytest.mark.parametrize("h, w", [(6, 5), (1080, 1920)])
def test_any_image_size(h: int, w: int) -> None:
    box = Box(w // 4, h // 4, w // 2 + 1, h // 2 + 1, 0.5, "a-rather-long-label")
    heat = np.full((h, w), 0.5, np.float32)
    out = render_overlay(_grey(h, w), heat, [box], "defect  score 0.93", defect=True)
    assert out.dtype == np.uint8 and out.shape[1:] == (w, 3) and out.shape[0] > h


def test_bad_image_is_refused() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        render_overlay(np.zeros((10, 10), np.uint8), None, [], "x")


def test_thumbnail() -> None:
    big = np.zeros((500, 1000, 3), np.uint8)
    assert thumbnail(big).shape == (128, 256, 3)
    assert thumbnail(big, max_side=100).shape == (50, 100, 3)
    small = np.zeros((100, 50), np.uint8)
    out = thumbnail(small)
    assert out.shape == (100, 50) and out is not small  # never enlarged, always a copy
    tall = np.full((1000, 10, 3), 7, np.uint8)
    t = thumbnail(tall)
    assert t.shape == (256, 3, 3) and (t == 7).all()
