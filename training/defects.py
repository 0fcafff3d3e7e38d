"""Named synthetic defects painted onto any RGB image, with a mask of exactly what changed.

``render_defect`` works on synthetic surfaces and on users' good images of any size: geometry
is drawn relative to the short side, line widths grow with resolution, and only a region of
interest (ROI) around the defect is touched, so a 4k frame costs about what a 256 px one does.

The mask is derived from the pixels, not from the drawn shape: a pixel is defective when some
channel changed by at least ``VISIBLE`` grey levels; faint tails below that are put back to the
input, so outside the mask the output equals the input byte for byte. Thin gaps are closed and
enclosed holes filled for blob-like defects (a dent's flat middle is part of the dent).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.training.surfaces import channel_max, fractal_noise, planes_of, to_uint8, value_noise, white_noise

DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "missing", "dent", "contamination")
VISIBLE = 4  # grey levels; smaller changes are invisible on a textured, noisy surface
MIN_MEAN_CHANGE = 8.0  # grey levels averaged over the mask: fainter defects are redrawn
MIN_SIDE = 16
_ATTEMPTS = 6


class _Look(NamedTuple):
    """How strongly to paint (0..1, above 1 on retries) and whether to invert the usual polarity."""

    strength: float
    flip: bool

    def sign(self, rng: np.random.Generator, p_bright: float, mean: float) -> float:
        """+1 to brighten, -1 to darken: the defect's usual polarity, but never towards a limit the
        region already sits at (a dark mark on black is invisible)."""
        s = 1.0 if rng.random() < p_bright else -1.0
        s = -s if self.flip else s
        if mean > 230:
            return -1.0
        return 1.0 if mean < 20 else s


@dataclass
class _Roi:
    """A rectangle of the image being painted: float planes (3, h, w) and absolute pixel coords."""

    y0: int
    y1: int
    x0: int
    x1: int
    planes: np.ndarray  # (3, h, w) float32 copy of image[y0:y1, x0:x1]
    yy: np.ndarray  # (h, 1) float32 absolute row of each pixel
    xx: np.ndarray  # (1, w) float32 absolute column

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def mean(self) -> float:
        return float(self.planes.mean())


class _Paint(NamedTuple):
    roi: _Roi
    planes: np.ndarray  # (3, h, w) float32, the painted ROI
    close: int  # closing kernel (px) applied to the visible-change mask, 0 for none
    fill_holes: bool
    min_blob: int  # visible specks smaller than this (px) are dropped


# --------------------------------------------------------------------------- public API


def render_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` (one of DEFECT_TYPES) at a random place, size and contrast.

    image: RGB uint8 (H, W, 3), any size with both sides >= 16; it is not modified.
    Returns (defective RGB uint8 (H, W, 3), mask bool (H, W)). The mask is never empty and
    covers every pixel that differs from `image`.
    """
    _check_input(image, kind)
    h, w = image.shape[:2]
    min_px = max(4, int(2e-5 * h * w))
    for attempt in range(_ATTEMPTS):
        # strength is skewed towards clear defects (median ~0.8; the per-type ranges keep some
        # subtle); retries (a saturated region, or too faint) go stronger, then flip polarity
        strength = 0.3 + 0.7 * rng.random() ** 0.5 if attempt == 0 else 1.0 + 0.25 * (attempt // 2)
        paint = _RENDERERS[kind](image, rng, _Look(strength, flip=attempt % 2 == 0 and attempt > 0))
        roi = paint.roi
        old = image[roi.y0:roi.y1, roi.x0:roi.x1]
        new = to_uint8(cv2.merge(list(paint.planes)))
        mask = _visible_change(old, new, paint)
        if int(mask.sum()) >= min_px and _mean_change(old, new, mask) >= MIN_MEAN_CHANGE:
            out, full = image.copy(), np.zeros((h, w), bool)
            out[roi.y0:roi.y1, roi.x0:roi.x1] = np.where(mask[..., None], new, old)
            full[roi.y0:roi.y1, roi.x0:roi.x1] = mask
            return out, full
    raise LineInspectError(
        f"could not paint a visible {kind} on a {w}x{h} image after {_ATTEMPTS} tries; "
        "is the image a flat saturated colour? use real surface images"
    )


def _check_input(image: np.ndarray, kind: str) -> None:
    if kind not in DEFECT_TYPES:
        raise LineInspectError(f"unknown defect type {kind!r}; choose one of: {', '.join(DEFECT_TYPES)}")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise LineInspectError(
            f"defects are painted on RGB uint8 (H, W, 3) images, got "
            f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}; read it with read_image"
        )
    if min(image.shape[:2]) < MIN_SIDE:
        raise LineInspectError(f"image is {image.shape[1]}x{image.shape[0]}; defects need both sides >= {MIN_SIDE}")


def _visible_change(old: np.ndarray, new: np.ndarray, paint: _Paint) -> np.ndarray:
    """bool (h, w): pixels changed by >= VISIBLE levels in some channel, tidied per defect style."""
    mask = (channel_max(cv2.absdiff(old, new)) >= VISIBLE).astype(np.uint8)
    if paint.close > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (paint.close, paint.close))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    if paint.fill_holes:
        mask = _fill_holes(mask)
    if paint.min_blob > 1:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < paint.min_blob)
        small = small[small > 0]
        if small.size and small.size < count - 1:  # never drop everything
            mask[np.isin(labels, small)] = 0
    return mask.astype(bool)


def _mean_change(old: np.ndarray, new: np.ndarray, mask: np.ndarray) -> float:
    return float(channel_max(cv2.absdiff(old, new))[mask].mean()) if mask.any() else 0.0


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """uint8 (h, w) 0/1 mask with background regions not touching the ROI border filled."""
    count, labels = cv2.connectedComponents(1 - mask, connectivity=4)
    if count <= 2:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes = ~np.isin(labels, border) & (mask == 0)
    return (mask | holes).astype(np.uint8)


# --------------------------------------------------------------------------- shared helpers


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform draw: small defects as common per octave as large ones."""
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _scale(image: np.ndarray) -> tuple[float, float]:
    """(short side s, line-width unit u): geometry scales with s, strokes with u >= 1 px."""
    s = float(min(image.shape[:2]))
    return s, max(1.0, s / 256)


def _region(image: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> _Roi:
    h, w = image.shape[:2]
    xa, ya = min(max(int(math.floor(x0)), 0), w - 1), min(max(int(math.floor(y0)), 0), h - 1)
    xb, yb = max(min(int(math.ceil(x1)) + 1, w), xa + 1), max(min(int(math.ceil(y1)) + 1, h), ya + 1)
    planes = np.ascontiguousarray(image[ya:yb, xa:xb].transpose(2, 0, 1), dtype=np.float32)
    return _Roi(ya, yb, xa, xb, planes, np.arange(ya, yb, dtype=np.float32)[:, None],
                np.arange(xa, xb, dtype=np.float32)[None, :])


def _region_around(image: np.ndarray, pts: np.ndarray, margin: float) -> _Roi:
    """ROI around points (N, 2) as (x, y), grown by `margin` px."""
    return _region(image, pts[:, 0].min() - margin, pts[:, 1].min() - margin,
                   pts[:, 0].max() + margin, pts[:, 1].max() + margin)


def _shade(planes: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Signed shading: field (h, w) in [-1, 1] moves each pixel that fraction of the way to white
    (positive) or black (negative), so a change never saturates unnaturally."""
    f = field[None]
    return planes + np.where(f > 0, f * (255 - planes), f * planes)


def _anywhere(rng: np.random.Generator, w: int, h: int) -> tuple[float, float]:
    """A defect centre anywhere but the outermost 4 %, where most of the defect would be cut off."""
    return rng.uniform(0.04, 0.96) * w, rng.uniform(0.04, 0.96) * h


def _light(rng: np.random.Generator) -> tuple[float, float]:
    a = rng.uniform(0, 2 * math.pi)
    return math.cos(a), math.sin(a)


def _ellipse(roi: _Roi, cx: float, cy: float, rx: float, ry: float, angle: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised elliptical coordinates (a, b) and radius q = |(a, b)| of each ROI pixel."""
    dx, dy = roi.xx - cx, roi.yy - cy
    c, s = math.cos(angle), math.sin(angle)
    a = (dx * c + dy * s) / rx
    b = (dy * c - dx * s) / ry
    return a, b, np.sqrt(a * a + b * b)


def _facing(roi: _Roi, cx: float, cy: float, light: tuple[float, float]) -> np.ndarray:
    """cos of the angle between (pixel - centre) and the light direction, (h, w) in [-1, 1]."""
    dx, dy = roi.xx - cx, roi.yy - cy
    return (dx * light[0] + dy * light[1]) / (np.sqrt(dx * dx + dy * dy) + 1e-3)


def _to_canvas(pts: np.ndarray, roi: _Roi) -> np.ndarray:
    """Float points (N, 2) in image coords -> int32 ROI coords with 4 fractional bits (shift=4)."""
    return np.rint((pts - (roi.x0, roi.y0)) * 16).astype(np.int32)


def _stroke(canvas: np.ndarray, pts: np.ndarray, roi: _Roi, width: float, value: float = 255) -> None:
    """Anti-aliased polyline; a sub-pixel width is drawn 1 px wide and proportionally fainter."""
    v = int(round(value * min(1.0, width)))
    cv2.polylines(canvas, [_to_canvas(pts, roi)], False, v, max(1, round(width)), cv2.LINE_AA, shift=4)


def _path(start: np.ndarray, heading: float, length: float, step: float, wiggle: float,
          rng: np.random.Generator) -> np.ndarray:
    """A meandering path (N, 2): heading drifts by `wiggle` rad per step and is pulled back."""
    n = max(2, int(length / step) + 1)
    turns = np.cumsum(rng.normal(0, wiggle, n))
    turns -= np.linspace(0, turns[-1], n) * 0.7  # keep the overall direction
    ang = heading + turns
    steps = np.stack([np.cos(ang), np.sin(ang)], 1) * step
    return start + np.cumsum(steps, 0) - steps[0]


# --------------------------------------------------------------------------- the defects


def _scratch(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Thin bright (groove catching light) or dark line: straight, arced or kinked, fading in and
    out along its length, sometimes a few parallel ones (one stroke of an abrasive)."""
    h, w = image.shape[:2]
    s, u = _scale(image)
    length = s * _logu(rng, 0.15, 0.9)
    centre = np.array(_anywhere(rng, w, h))
    heading = rng.uniform(0, 2 * math.pi)
    curve = rng.normal(0, 0.6)  # total bend in radians, arcs and near-straight lines
    n = 40
    ang = heading + curve * np.linspace(-0.5, 0.5, n) + np.cumsum(rng.normal(0, 0.02, n))
    if rng.random() < 0.3:  # kinked: the tool jumped
        ang += np.repeat(rng.normal(0, 0.25, 4), -(-n // 4))[:n]
    base = np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * (length / n), 0)
    base += centre - base[n // 2]
    normal = np.array((-math.sin(heading), math.cos(heading)))
    offsets = [0.0] if rng.random() < 0.7 else list(np.cumsum(rng.uniform(2, 8, rng.integers(2, 5)) * u))
    width = rng.uniform(0.8, 2.8) * u
    roi = _region_around(image, np.concatenate([base + normal * o for o in offsets]), width + 4 * u)
    canvas = np.zeros(roi.shape, np.uint8)
    shadow = np.zeros(roi.shape, np.uint8)
    for o in offsets:
        keep = slice(int(rng.integers(0, n // 5)), n - int(rng.integers(0, n // 5)))
        line = base[keep] + normal * o
        _stroke(canvas, line, roi, width * rng.uniform(0.6, 1.0))
        _stroke(shadow, line + normal * (width * 0.5 + u), roi, 0.8 * u)
    fade = np.clip(0.55 + 0.5 * value_noise(*roi.shape, max(4.0, length / 5), rng), 0.1, 1.0)
    alpha = canvas.astype(np.float32) * (fade / 255)
    sign = look.sign(rng, 0.6, roi.mean())
    amount = look.strength * rng.uniform(0.45, 0.95)
    field = sign * amount * alpha
    if rng.random() < 0.5:  # the groove's far wall: a faint line of the opposite polarity
        field = field - sign * 0.4 * amount * shadow.astype(np.float32) * (fade / 255)
    return _Paint(roi, _shade(roi.planes, np.clip(field, -1, 1)), 0, False, 2)


def _crack(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Jagged dark fissure growing both ways from a seed, tapering, with side branches and a
    faint shadowed halo."""
    h, w = image.shape[:2]
    s, u = _scale(image)
    extent = s * _logu(rng, 0.12, 0.7)
    seed = np.array(_anywhere(rng, w, h))
    heading = rng.uniform(0, 2 * math.pi)
    width = rng.uniform(0.8, 1.8) * u
    step = max(1.5, 2.5 * u)
    strokes: list[tuple[np.ndarray, float]] = []
    for direction in (heading, heading + math.pi):
        _grow(seed, direction, extent * rng.uniform(0.3, 0.7), width, step, 0, rng, strokes)
    pts = np.concatenate([p for p, _ in strokes])
    roi = _region_around(image, pts, width + 6 * u)
    canvas = np.zeros(roi.shape, np.uint8)
    for seg, wd in strokes:
        _stroke(canvas, seg, roi, wd)
    alpha = canvas.astype(np.float32) / 255
    halo = cv2.GaussianBlur(alpha, (0, 0), 1.5 * u) * rng.uniform(0.15, 0.4)
    amount = look.strength * rng.uniform(0.55, 0.95)
    field = look.sign(rng, 0.0, roi.mean()) * amount * np.maximum(alpha, halo)
    return _Paint(roi, _shade(roi.planes, field), 0, False, 2)


def _grow(start: np.ndarray, heading: float, length: float, width: float, step: float, depth: int,
          rng: np.random.Generator, out: list[tuple[np.ndarray, float]]) -> None:
    """Append the crack path from `start` as short strokes of tapering width, branching."""
    n = max(3, int(length / step) + 1)
    # jagged: each step turns independently about a slowly drifting main direction
    ang = heading + np.cumsum(rng.normal(0, 0.05, n)) + rng.normal(0, 0.5, n)
    steps = np.stack([np.cos(ang), np.sin(ang)], 1) * (step * rng.uniform(0.5, 1.5, (n, 1)))
    path = start + np.cumsum(steps, 0) - steps[0]
    for i in range(0, n - 1, 2):
        taper = (1 - i / n) ** 0.6
        out.append((path[i:i + 3], max(0.5, width * taper)))
        if depth < 2 and rng.random() < 0.08 and n - i > 4:
            branch = heading + rng.choice((-1, 1)) * rng.uniform(0.4, 1.1)
            _grow(path[i], branch, (n - i) * step * rng.uniform(0.25, 0.6), width * taper * 0.7, step,
                  depth + 1, rng, out)


def _hole(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Round or oval pit: dark floor, the inner wall facing the light lit, a raised rim bright on
    the light side and shadowed on the other."""
    h, w = image.shape[:2]
    s, _ = _scale(image)
    r = s * _logu(rng, 0.015, 0.09)
    ry, angle = r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)
    cx, cy = _anywhere(rng, w, h)
    roi = _region(image, cx - 1.5 * r, cy - 1.5 * r, cx + 1.5 * r, cy + 1.5 * r)
    _, _, q = _ellipse(roi, cx, cy, r, ry, angle)
    q = q * (1 + 0.06 * value_noise(*roi.shape, max(2.0, r / 2), rng))  # a slightly irregular edge
    inside = np.clip((1 - q) * ry / 1.2 + 0.5, 0, 1)  # ~1 px anti-aliased edge
    facing = _facing(roi, cx, cy, _light(rng))
    depth = look.strength * rng.uniform(0.45, 0.9)
    floor = -depth * (1 - 0.55 * np.clip(-facing, 0, 1) * np.clip(q, 0, 1))
    rim = np.exp(-(((q - 1.12) / 0.1) ** 2)) * facing * look.strength * rng.uniform(0.15, 0.45)
    sign = -1.0 if look.flip else 1.0
    field = sign * (inside * floor + (1 - inside) * rim)
    return _Paint(roi, _shade(roi.planes, np.clip(field, -1, 1)), 3, True, 4)


_STAIN_COLORS = ((150, 72, 30), (130, 105, 60), (70, 70, 76), (200, 194, 176), (45, 55, 100))  # rust first


def _stain(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Soft-edged blob with an irregular outline: oil (darker, warmer), water mark (tide ring),
    rust or a dye spot."""
    h, w = image.shape[:2]
    s, _ = _scale(image)
    r = s * _logu(rng, 0.04, 0.3)
    cx, cy = _anywhere(rng, w, h)
    roi = _region(image, cx - 1.5 * r, cy - 1.5 * r, cx + 1.5 * r, cy + 1.5 * r)
    _, _, q = _ellipse(roi, cx, cy, r, r * rng.uniform(0.5, 1.0), rng.uniform(0, math.pi))
    field = 1 - q + 0.35 * fractal_noise(*roi.shape, max(3.0, 0.6 * r), rng, 3)
    alpha = np.clip(field / rng.uniform(0.08, 0.5), 0, 1)
    alpha = alpha * np.clip(0.85 + 0.2 * value_noise(*roi.shape, max(3.0, r / 4), rng), 0, 1)
    amount = look.strength * rng.uniform(0.25, 0.7)
    # a retry (nothing visible, e.g. a tint on black) uses the signed water mark, which always shows
    style = 1 if look.flip else rng.integers(4)
    p = roi.planes
    if style == 0:  # oil: darker, blue absorbed most so it reads brown/yellow
        new = p * (1 - amount * alpha[None] * planes_of((0.8, 0.9, 1.1)))
    elif style == 1:  # water mark: faint body, pronounced tide ring at the dried edge
        ring = 4 * alpha * (1 - alpha)
        new = _shade(p, look.sign(rng, 0.4, roi.mean()) * amount * (0.3 * alpha + 0.9 * ring))
    else:  # rust or residue: a tint that keeps the texture underneath
        color = np.array(_STAIN_COLORS[0 if style == 2 else rng.integers(1, len(_STAIN_COLORS))], np.float32)
        hue = 1 + rng.uniform(0.3, 0.7) * (color / color.mean() - 1)  # muted: soaked in, not painted on
        gain = hue * rng.uniform(0.55, 1.05)  # stains mostly darken
        k = np.clip(1.6 * amount, 0, 1) * alpha
        new = p * (1 + k[None] * (planes_of(gain) - 1))
    return _Paint(roi, new, max(5, int(r / 4)) | 1, True, 8)


def _missing(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Chipped-off or missing piece: a hard jagged outline showing what lies beneath (dark void,
    darker substrate or lighter bare material), rough inside, its broken wall lit on one side."""
    h, w = image.shape[:2]
    s, u = _scale(image)
    r = s * _logu(rng, 0.03, 0.22)
    cx, cy = _anywhere(rng, w, h)
    if rng.random() < 0.35:  # chips often start at an edge of the part or frame
        if rng.random() < 0.5:
            cx = float(rng.choice((0, w - 1)))
        else:
            cy = float(rng.choice((0, h - 1)))
    count = 48
    ang = np.linspace(0, 2 * math.pi, count, endpoint=False) + rng.uniform(0, 0.1, count)
    # outline: a few low harmonics give the overall chip shape, per-vertex noise the broken edge
    k = np.arange(2, 6)[:, None]
    lobes = (rng.normal(0, 0.12, (4, 1)) * np.cos(k * ang + rng.uniform(0, 2 * math.pi, (4, 1)))).sum(0)
    rad = r * np.clip(1 + lobes + rng.normal(0, 0.04, count), 0.35, 1.6)
    rad *= rng.uniform(0.45, 1.0) ** np.abs(np.cos(ang - rng.uniform(0, math.pi)))  # elongated
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
    roi = _region_around(image, pts, 3 * u)
    canvas = np.zeros(roi.shape, np.uint8)
    _fill(canvas, pts, roi)
    alpha = canvas.astype(np.float32) / 255
    mean = roi.planes.reshape(3, -1).mean(1)
    choice = rng.integers(3)
    if choice == 0:  # a void: background or shadow seen through
        target = mean * rng.uniform(0.05, 0.3)
    elif choice == 1:  # a darker substrate of another tint
        target = mean * rng.uniform(0.45, 0.75) + rng.uniform(-15, 15, 3)
    else:  # lighter bare material under a coating or glaze
        target = mean + (255 - mean) * rng.uniform(0.3, 0.6)
    if look.flip:
        target = 255 - target
    fill = mean + max(0.4, min(look.strength, 1.0)) * (target - mean)
    rough = fractal_noise(*roi.shape, rng.uniform(2, 6) * u, rng, 3) * rng.uniform(4, 12)
    rough += white_noise(roi.shape, rng) * rng.uniform(1, 3)  # sensor noise, as on the surface around
    fill_planes = planes_of(fill) + rough[None]
    # the broken wall: a band just inside the outline, lit where it faces the light
    inner = cv2.distanceTransform((canvas > 127).astype(np.uint8), cv2.DIST_L2, 3)
    band = np.clip(1 - inner / (rng.uniform(1, 3) * u), 0, 1) * alpha
    wall = -_facing(roi, cx, cy, _light(rng)) * band * rng.uniform(0.2, 0.5)
    new = roi.planes + (fill_planes - roi.planes) * alpha[None]
    return _Paint(roi, _shade(np.clip(new, 0, 255), wall), 3, True, 4)


def _dent(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Shallow depression: a light/dark shading pair from the slope of a smooth bowl lit from one
    side, and the texture slightly pulled in by the deformation."""
    h, w = image.shape[:2]
    s, u = _scale(image)
    r = s * _logu(rng, 0.04, 0.2)
    cx, cy = _anywhere(rng, w, h)
    roi = _region(image, cx - 2 * r, cy - 2 * r, cx + 2 * r, cy + 2 * r)
    a, b, q = _ellipse(roi, cx, cy, r, r * rng.uniform(0.35, 1.0), rng.uniform(0, math.pi))
    depth = -np.exp(-1.5 * (q * (1 + 0.1 * value_noise(*roi.shape, max(3.0, r / 2), rng))) ** 2)
    gy, gx = np.gradient(depth)
    gmax = float(np.sqrt(gx * gx + gy * gy).max()) + 1e-6
    lx, ly = _light(rng)
    slope = (gx * lx + gy * ly) / gmax  # [-1, 1]: the wall facing the light is lit, the other dark
    pull = r * rng.uniform(0.02, 0.08)
    hh, ww = roi.shape
    map_x = (np.arange(ww, dtype=np.float32)[None, :] + pull * gx / gmax).astype(np.float32)
    map_y = (np.arange(hh, dtype=np.float32)[:, None] + pull * gy / gmax).astype(np.float32)
    hwc = cv2.merge(list(roi.planes))
    warped = cv2.remap(hwc, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    planes = np.ascontiguousarray(warped.transpose(2, 0, 1))
    amount = look.strength * rng.uniform(0.3, 0.7) * (-1.0 if look.flip else 1.0)
    return _Paint(roi, _shade(planes, np.clip(amount * slope, -1, 1)), max(5, int(r / 3)) | 1, True, 8)


def _contamination(image: np.ndarray, rng: np.random.Generator, look: _Look) -> _Paint:
    """Foreign matter in a cluster: dust specks, small chips or fibres (lint, hair), each casting
    a faint shadow."""
    h, w = image.shape[:2]
    s, u = _scale(image)
    spread = s * _logu(rng, 0.015, 0.12)
    cx, cy = _anywhere(rng, w, h)
    style = rng.integers(4)  # dust, chips, fibres, mixed
    fibre_len = s * _logu(rng, 0.04, 0.25)
    reach = spread * 2.5 + (fibre_len if style >= 2 else 0)
    roi = _region(image, cx - reach, cy - reach, cx + reach, cy + reach)
    canvas = np.zeros(roi.shape, np.uint8)
    if style in (0, 3):
        for x, y in rng.normal((cx, cy), spread / 2, (int(rng.integers(10, 80)), 2)):
            cv2.circle(canvas, (int(x) - roi.x0, int(y) - roi.y0), int(rng.integers(0, 2) * u),
                       int(rng.uniform(120, 255)), -1, cv2.LINE_AA)
    if style in (1, 3):
        for c in rng.normal((cx, cy), spread / 2, (int(rng.integers(2, 12)), 2)):
            k = int(rng.integers(4, 8))
            a = np.sort(rng.uniform(0, 2 * math.pi, k))
            rad = rng.uniform(0.8, 4.0) * u * rng.uniform(0.5, 1.0, k)
            _fill(canvas, c + np.stack([rad * np.cos(a), rad * np.sin(a)], 1), roi)
    if style in (2, 3):
        for _ in range(int(rng.integers(1, 4))):
            start = rng.normal((cx, cy), spread / 2)
            path = _path(start, rng.uniform(0, 2 * math.pi), fibre_len * rng.uniform(0.4, 1.0),
                         max(1.5, 2 * u), 0.25, rng)
            _stroke(canvas, path, roi, rng.uniform(0.7, 1.6) * u, rng.uniform(170, 255))
    alpha = canvas.astype(np.float32) * (min(1.0, 0.55 + 0.45 * look.strength) / 255)
    shadow = np.roll(cv2.GaussianBlur(alpha, (0, 0), u), (max(1, round(u)),) * 2, (0, 1)) * 0.3
    mean = roi.mean()
    # dark grime, pale lint or dust, rust-brown; fibres may also be dyed
    pick = rng.integers(4 if style >= 2 else 3)
    color = (rng.uniform(15, 60) * rng.normal(1, 0.08, 3), rng.uniform(180, 240) * rng.normal(1, 0.03, 3),
             np.array((120.0, 70, 35)) * rng.uniform(0.7, 1.2),
             np.array(((40.0, 50, 110), (150, 40, 40), (30, 30, 32), (90, 110, 60))[rng.integers(4)]))[pick]
    if abs(float(color.mean()) - mean) < 40 or look.flip:  # the same tone as the surface: invisible
        color = np.full(3, 20.0 if mean > 128 else 235.0)
    planes = _shade(roi.planes, -shadow)
    planes = planes + (planes_of(color) - planes) * alpha[None]
    return _Paint(roi, planes, 0, False, 1)


def _fill(canvas: np.ndarray, pts: np.ndarray, roi: _Roi) -> None:
    cv2.fillPoly(canvas, [_to_canvas(pts, roi)], 255, cv2.LINE_AA, shift=4)


_RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator, _Look], _Paint]] = {
    "scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "missing": _missing,
    "dent": _dent, "contamination": _contamination,
}
