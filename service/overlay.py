"""Pictures for people: heatmap and boxes over the input image, with a verdict header bar.

Used by ``lineinspect predict --heatmap-dir`` and the audit HTML report. Everything is RGB uint8.
Text uses OpenCV's Hershey font, which draws ASCII only (other characters come out as '?').
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from lineinspect.vision.postprocess import upsample_map
from lineinspect.vision.result import Box

__all__ = ["render_overlay", "thumbnail"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BOX_RGB = (255, 0, 255)  # magenta: stands out from both the image and the JET palette
_BAR_RGB = {True: (200, 30, 30), False: (30, 140, 60), None: (60, 60, 60)}  # defect / good / unknown


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")


def _fit_text(text: str, max_width: int, scale: float, thickness: int) -> tuple[str, float]:
    """Shrink the font (down to 0.3) and then cut the text until it fits `max_width` pixels."""
    while scale > 0.3 and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > max_width:
        scale = max(0.3, scale * 0.9)
    while len(text) > 1 and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > max_width:
        text = text[:-2] + "~"
    return text, scale


def render_overlay(
    image: np.ndarray,
    heatmap: np.ndarray | None,
    boxes: Sequence[Box],
    verdict_text: str,
    defect: bool | None = None,
    alpha: float = 0.4,
    min_heat: float = 0.3,
) -> np.ndarray:
    """Image (H, W, 3) -> overlay (H + bar, W, 3) RGB uint8, the header bar stacked above the image.

    heatmap: (h, w) float in [0, 1] (values outside are clipped, NaN counts as 0), resized
    bilinearly when its size differs from the image. It is drawn with the JET palette at up to
    `alpha` opacity, fading out linearly below `min_heat` so a clean part stays untinted.
    boxes: drawn with "label score" tags. defect picks the bar colour (red / green / grey).
    Line widths and font grow with the image so the picture reads the same at any size.
    """
    _check_image(image)
    h, w = image.shape[:2]
    out = image.copy()
    if heatmap is not None:
        heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
        if heat.ndim != 2:
            raise ValueError(f"heatmap must be (H, W), got shape {heat.shape}")
        if heat.shape != (h, w):
            heat = upsample_map(heat, h, w)
        heat = np.clip(heat, 0.0, 1.0)
        colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).round().astype(np.uint8), cv2.COLORMAP_JET),
                              cv2.COLOR_BGR2RGB)
        weight = (alpha * np.clip(heat / max(min_heat, 1e-6), 0.0, 1.0))[..., None]  # (H, W, 1)
        out = (out * (1.0 - weight) + colour * weight).round().astype(np.uint8)

    unit = max(h, w) / 640.0  # 1.0 for a VGA frame
    thickness = max(1, round(2 * unit))
    font_scale = max(0.35, 0.5 * unit)
    for b in boxes:
        x0, y0 = int(np.clip(b.x0, 0, w - 1)), int(np.clip(b.y0, 0, h - 1))
        x1, y1 = int(np.clip(b.x1 - 1, 0, w - 1)), int(np.clip(b.y1 - 1, 0, h - 1))  # last pixel inside
        cv2.rectangle(out, (x0, y0), (x1, y1), _BOX_RGB, thickness)
        tag = f"{b.label} {b.score:.2f}".strip()
        tag, scale = _fit_text(tag, max(w - x0, 8), font_scale, 1)
        (tw, th), base = cv2.getTextSize(tag, _FONT, scale, 1)
        ty = y0 - base - 1 if y0 - th - base - 2 >= 0 else min(y0 + th + 2, h - 1)  # above, else inside
        cv2.rectangle(out, (x0, ty - th - 1), (x0 + tw + 1, ty + base), _BOX_RGB, cv2.FILLED)
        cv2.putText(out, tag, (x0 + 1, ty), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)

    head_scale = max(0.4, 0.7 * unit)
    head_thick = max(1, round(unit))
    text, head_scale = _fit_text(verdict_text, max(w - 8, 8), head_scale, head_thick)
    (_, th), base = cv2.getTextSize(text or " ", _FONT, head_scale, head_thick)
    bar = np.empty((th + base + 2 * max(3, round(4 * unit)), w, 3), dtype=np.uint8)
    bar[:] = _BAR_RGB[defect]
    cv2.putText(bar, text, (min(4, w - 1), (bar.shape[0] + th) // 2 - 1), _FONT, head_scale,
                (255, 255, 255), head_thick, cv2.LINE_AA)
    return np.concatenate([bar, out], axis=0)


def thumbnail(image: np.ndarray, max_side: int = 256) -> np.ndarray:
    """Shrink (never enlarge) so the longer side is at most `max_side`, keeping the aspect ratio.

    Works on (H, W) and (H, W, C) uint8 images; area averaging avoids aliasing.
    """
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
