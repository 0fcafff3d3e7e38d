"""Synthetic defect-free surfaces: machined metal, woven textile, tile/cast, PCB.

Each surface is drawn on a canvas a little larger than asked, then given the variation a real
line shows between good parts: a small pose change, uneven light and vignetting, exposure and
colour drift, sensor noise. Pure numpy/OpenCV, drawing only from the caller's
``np.random.Generator``, so a seeded generator gives the same image every time.

Feature sizes below are written in pixels of a 256 px image and scaled by ``k = size / 256``.
Builders work on colour planes (3, H, W): numpy broadcasts a (H, W) field over planes several
times faster than over a trailing axis of 3, and ``cv2.merge`` turns planes into (H, W, 3) cheaply.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from lineinspect.errors import LineInspectError

SURFACES = ("metal", "textile", "tile", "pcb")
_REF = 256.0


def make_surface(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free surface of one `kind` in SURFACES, RGB uint8 (size, size, 3)."""
    if kind not in SURFACES:
        raise LineInspectError(f"unknown surface {kind!r}; choose one of: {', '.join(SURFACES)}")
    if not 16 <= size <= 4096:
        raise LineInspectError(f"surface size {size} is out of range; use 16 to 4096 pixels")
    k = size / _REF
    canvas = int(size * 1.15) + 8  # margin so the pose jitter never shows the canvas edge
    planes = _BUILDERS[kind](canvas, k, rng)  # (3, canvas, canvas) float32, about 0..255
    planes = _lighting(planes, rng)
    img = _pose_jitter(cv2.merge(list(planes)), size, rng)  # (size, size, 3)
    img = _sensor(img, k, rng)
    return to_uint8(img)


# --------------------------------------------------------------------------- noise helpers


def value_noise(h: int, w: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean unit-variance noise (h, w) float32 with features about `cell` px across."""
    gh, gw = max(2, round(h / max(cell, 1.0)) + 2), max(2, round(w / max(cell, 1.0)) + 2)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return _unit(out)


def fractal_noise(h: int, w: int, cell: float, rng: np.random.Generator, octaves: int = 4,
                  gain: float = 0.5) -> np.ndarray:
    """Sum of value-noise octaves from `cell` px down (mottling, blob edges), (h, w) unit std."""
    total = np.zeros((h, w), np.float32)
    amp = 1.0
    for _ in range(octaves):
        total += amp * value_noise(h, w, cell, rng)
        cell, amp = max(cell / 2, 1.0), amp * gain
    return _unit(total)


def white_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance white noise, float32. Uniform rather than Gaussian: it is several
    times faster to draw, and once blurred or added to a texture the two look the same."""
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(3.4641016)


def grain_noise(h: int, w: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Fine isotropic grain: white noise blurred by `sigma` px, (h, w) unit std."""
    noise = white_noise((h, w), rng)
    if sigma > 0.3:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return _unit(noise)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image -> uint8, rounded and saturated (cv2's saturating convert, much faster than clip)."""
    return cv2.convertScaleAbs(np.maximum(img, 0, dtype=np.float32))


def channel_max(img: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W), each pixel's largest channel: numpy's max over a last axis of 3 runs 40-60x
    slower (1.6 ms against 28 us on a 224x224x3 array), and painting a defect takes several."""
    return functools.reduce(np.maximum, (img[..., c] for c in range(img.shape[-1])))


def _unit(a: np.ndarray) -> np.ndarray:
    mean, std = cv2.meanStdDev(a)  # several times faster than numpy's two passes
    return ((a - np.float32(mean[0, 0])) * np.float32(1 / (std[0, 0] + 1e-6))).astype(np.float32)


def planes_of(color: np.ndarray) -> np.ndarray:
    """An RGB colour (3,) as (3, 1, 1), to broadcast over planes."""
    return np.asarray(color, np.float32).reshape(3, 1, 1)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (yy (n,1), xx (1,n)) as float32, for broadcasting."""
    ax = np.arange(n, dtype=np.float32)
    return ax[:, None], ax[None, :]


def _jitter(color: tuple[float, float, float], rng: np.random.Generator, amount: float) -> np.ndarray:
    """An RGB colour with brightness and per-channel jitter (batches and dye lots differ)."""
    c = np.asarray(color, np.float32) * rng.uniform(1 - amount, 1 + amount)
    return c * (1 + rng.normal(0, amount / 3, 3)).astype(np.float32)


# --------------------------------------------------------------------------- metal


def _metal(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    style = rng.choice(3, p=(0.45, 0.35, 0.2))
    relief = (_brushed, _turned, _blasted)[style](n, k, rng)  # (n, n), roughly unit std
    tone = rng.uniform(95, 195)
    grey = tone + rng.uniform(9, 22) * relief
    # steel reads slightly blue, aluminium neutral, brass/bronze-ish machining oil warm
    tint = np.array(((1.0, 1.0, 1.0), (0.95, 0.99, 1.06), (1.06, 1.0, 0.9))[rng.integers(3)], np.float32)
    return grey[None] * planes_of(tint * (1 + rng.normal(0, 0.015, 3)))


def _brushed(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Directional streaks: row noise smeared along x, with broader bands and a sheen band."""
    length = max(8, int(n * rng.uniform(0.15, 0.6)))
    fine = _unit(cv2.blur(white_noise((n, n), rng), (length, 1)))
    fine = cv2.GaussianBlur(fine, (0, 0), sigmaX=0.1, sigmaY=0.5 * max(k, 0.5))
    bands = _unit(cv2.blur(white_noise((n, n), rng), (n // 2, max(2, int(4 * k)))))
    x = np.linspace(-1, 1, n, dtype=np.float32)
    # anisotropic reflection: the highlight runs across the brushing direction
    sheen = np.exp(-(((x - rng.uniform(-0.7, 0.7)) / rng.uniform(0.25, 0.8)) ** 2)) * rng.uniform(0.3, 2.0)
    relief = 0.8 * fine + 0.35 * bands + 0.3 * fractal_noise(n, n, 60 * k, rng, 3) + sheen[None, :]
    return np.ascontiguousarray(relief.T) if rng.random() < 0.5 else relief


def _turned(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Turning or facing marks: concentric grooves, bands of varying depth and a bow-tie sheen."""
    if rng.random() < 0.5:
        cx, cy = rng.uniform(0.15, 0.85) * n, rng.uniform(0.15, 0.85) * n
    else:  # tool centre far outside: the rings read as gentle arcs (milled/faced look)
        a, d = rng.uniform(0, 2 * np.pi), n * rng.uniform(0.9, 2.5)
        cx, cy = n / 2 + d * math.cos(a), n / 2 + d * math.sin(a)
    yy, xx = _grid(n)
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    period = max(2.2, rng.uniform(2.5, 6.0) * k)
    grooves = np.sin(2 * np.pi * r / period + 0.8 * value_noise(n, n, 40 * k, rng))
    profile = cv2.GaussianBlur(rng.standard_normal((1, int(r.max()) + 8)).astype(np.float32), (0, 0),
                               rng.uniform(2, 8) * k).ravel()
    bands = np.interp(r, np.arange(profile.size), profile / (profile.std() + 1e-6)).astype(np.float32)
    phi = np.arctan2(yy - cy, xx - cx)
    bowtie = np.cos(phi - rng.uniform(0, np.pi)) ** 2
    relief = (0.45 * grooves + 0.6 * bands + rng.uniform(0.5, 2.0) * bowtie ** rng.uniform(1, 4)
              + 0.25 * grain_noise(n, n, 0.5, rng))
    return relief.astype(np.float32)


def _blasted(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Bead-blasted or ground matte finish: isotropic grain, mottling and sparse glints."""
    glints = (rng.random((n, n)) < rng.uniform(0.001, 0.01)).astype(np.float32)
    glints = cv2.GaussianBlur(glints, (0, 0), 0.6 * max(k, 0.6)) * rng.uniform(4, 10)
    # a fine, even matte: about half the relief of machined marks
    return (0.45 * grain_noise(n, n, 0.8 * k, rng) + 0.3 * fractal_noise(n, n, 50 * k, rng, 3)
            + glints).astype(np.float32)


# --------------------------------------------------------------------------- textile

_WEAVES = (
    lambda i, j: (i + j) % 2 == 0,  # plain
    lambda i, j: (i + j) % 3 != 0,  # 2/1 twill
    lambda i, j: (i + j) % 4 < 2,  # 2/2 twill
    lambda i, j: (i // 2 + j // 2) % 2 == 0,  # basket
)
_YARNS = (  # (warp, weft) RGB: denim, grey suiting, canvas, black, red, olive, white, navy/khaki
    ((45, 65, 115), (185, 185, 195)), ((120, 120, 125), (95, 95, 100)), ((200, 185, 150), (190, 175, 140)),
    ((45, 45, 50), (60, 60, 66)), ((160, 35, 45), (140, 30, 40)), ((95, 100, 60), (85, 90, 55)),
    ((225, 225, 220), (215, 215, 210)), ((40, 45, 80), (170, 150, 110)),
)


def _textile(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Warp (vertical) and weft (horizontal) yarns interlaced by a weave table, with wavy, uneven,
    hairy yarns. A pixel's thread index is the pitch cell its (displaced) coordinate falls in."""
    pitch = max(3.0, rng.uniform(5, 12) * k)
    weave = _WEAVES[rng.integers(len(_WEAVES))]
    yy, xx = _grid(n)
    wob = pitch * rng.uniform(0.05, 0.2)
    xd = xx + wob * value_noise(n, n, 30 * k, rng)
    yd = yy + wob * value_noise(n, n, 30 * k, rng) + rng.uniform(-0.04, 0.04) * (xx - n / 2) ** 2 / n  # bow
    ix, iy = np.floor(xd / pitch).astype(np.int32), np.floor(yd / pitch).astype(np.int32)
    # position across the warp / weft cell, 0..1
    u, v = xd / pitch - ix.astype(np.float32), yd / pitch - iy.astype(np.float32)
    count = int(n / pitch) + 64
    thick_w, thick_f = (rng.uniform(0.8, 1.0, count).astype(np.float32) for _ in range(2))
    tone_w, tone_f = (rng.normal(1, 0.05, count).astype(np.float32) for _ in range(2))
    over = weave(ix, iy)
    roundness = rng.uniform(0.3, 0.7)
    # a yarn bends down only where it passes under a crossing yarn, not along a float
    warp_run = _float_ends(v, weave(ix, iy - 1), weave(ix, iy + 1))
    weft_run = _float_ends(u, ~weave(ix - 1, iy), ~weave(ix + 1, iy))
    warp = (_yarn_profile(u, np.take(thick_w, ix, mode="wrap"), roundness)
            * np.take(tone_w, ix, mode="wrap") * warp_run)
    weft = (_yarn_profile(v, np.take(thick_f, iy, mode="wrap"), roundness)
            * np.take(tone_f, iy, mode="wrap") * weft_run)
    slub_len = max(3, int(pitch * rng.uniform(1, 4)))
    noise = white_noise((n, n), rng)
    hair_w = _unit(cv2.blur(noise, (1, slub_len)))  # fibres and slubs run along the warp ...
    hair_f = _unit(cv2.blur(noise, (slub_len, 1)))  # ... and along the weft
    shade = np.where(over, warp * (1 + 0.07 * hair_w), weft * (1 + 0.07 * hair_f))
    pair = _YARNS[rng.integers(len(_YARNS))]
    warp_c, weft_c = _jitter(pair[0], rng, 0.12), _jitter(pair[1], rng, 0.12)
    color = np.where(over[None], planes_of(warp_c), planes_of(weft_c))
    img = color * (0.4 + 0.7 * shade)[None]
    sigma = 0.45 * max(k, 0.6)  # optics: no perfectly hard yarn edges
    return np.stack([cv2.GaussianBlur(p, (0, 0), sigma) for p in img])


def _yarn_profile(t: np.ndarray, thickness: np.ndarray, roundness: float) -> np.ndarray:
    """Brightness across a yarn: 1 on its crown, falling to 0 in the gap between yarns."""
    d = np.abs(t - 0.5) / (0.5 * thickness)
    return np.clip(1 - d * d, 0, 1) ** roundness


def _float_ends(t: np.ndarray, same_before: np.ndarray, same_after: np.ndarray) -> np.ndarray:
    """Shading along a yarn over its cell (t in 0..1): darker towards a cell edge where the yarn
    dives under the neighbouring cell, flat where the float continues."""
    before = np.where(same_before, 1.0, np.clip(t / 0.4, 0, 1) ** 0.5)
    after = np.where(same_after, 1.0, np.clip((1 - t) / 0.4, 0, 1) ** 0.5)
    return (0.55 + 0.45 * before * after).astype(np.float32)


# --------------------------------------------------------------------------- tile / cast

_MINERALS = (
    (200, 195, 184), (186, 108, 78), (150, 149, 142), (92, 90, 88), (212, 206, 190), (118, 118, 122),
    (172, 160, 140),
)


def _tile(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Ceramic, concrete or sand-cast surface: mottled tone, granular relief lit from one side,
    aggregate speckles of other colours, and a few small pores."""
    base = _jitter(_MINERALS[rng.integers(len(_MINERALS))], rng, 0.12)
    mott = fractal_noise(n, n, rng.uniform(30, 90) * k, rng, 4)
    tint = np.stack([value_noise(n, n, 70 * k, rng) for _ in range(3)]) * rng.uniform(0, 0.008)
    height = grain_noise(n, n, rng.uniform(0.6, 1.6) * k, rng)
    a = rng.uniform(0, 2 * np.pi)
    lx, ly = math.cos(a), math.sin(a)
    # relief shading = directional derivative of the height towards the light
    relief = _unit(lx * cv2.Sobel(height, cv2.CV_32F, 1, 0) + ly * cv2.Sobel(height, cv2.CV_32F, 0, 1))
    img = planes_of(base) * (1 + rng.uniform(0.015, 0.06) * mott[None] + tint)
    img = img + (rng.uniform(3, 12) * relief + rng.uniform(1, 5) * grain_noise(n, n, 0.5, rng))[None]
    grains = (rng.random((n, n)) < rng.uniform(0.003, 0.04)).astype(np.float32)
    grains = cv2.GaussianBlur(grains, (0, 0), 0.7 * max(k, 0.6))
    grains /= max(float(grains.max()), 1e-6)
    # grains darker or lighter than the matrix, a little off its hue
    speck = (rng.normal() + rng.normal(0, 0.25, 3)).astype(np.float32) * rng.uniform(10, 45)
    img = img + grains[None] * planes_of(speck)
    return _pores(img, k, rng)


def _pores(img: np.ndarray, k: float, rng: np.random.Generator) -> np.ndarray:
    n = img.shape[1]
    canvas = np.zeros((n, n), np.uint8)
    for _ in range(rng.poisson(rng.uniform(2, 25) * (n / _REF) ** 2)):
        x, y = rng.uniform(0, n, 2)
        r = max(1, round(rng.uniform(0.6, 1.8) * k))
        cv2.circle(canvas, (int(x), int(y)), r, int(rng.uniform(90, 230)), -1, cv2.LINE_AA)
    return img * (1 - canvas.astype(np.float32) * (0.55 / 255))[None]


# --------------------------------------------------------------------------- PCB

_MASKS = ((30, 95, 55), (25, 70, 40), (30, 60, 120), (25, 25, 28), (150, 30, 30), (215, 215, 205))
_FINISH = ((210, 170, 85), (192, 192, 186), (200, 120, 80))  # ENIG gold, HASL tin, bare copper


def _pcb(n: int, k: float, rng: np.random.Generator) -> np.ndarray:
    """Solder mask over glass weave, copper traces on a routing grid (seen through the mask), pads,
    vias and silkscreen, drawn as anti-aliased layers and composited."""
    mask_c = _jitter(_MASKS[rng.choice(len(_MASKS), p=(0.5, 0.15, 0.12, 0.1, 0.05, 0.08))], rng, 0.1)
    finish = _jitter(_FINISH[rng.choice(3, p=(0.55, 0.35, 0.1))], rng, 0.06)
    pitch = rng.uniform(10, 20) * k
    yy, xx = _grid(n)
    weave_p = max(2.5, 4 * k)
    img = planes_of(mask_c) * (
        1 + 0.03 * (np.sin(2 * np.pi * xx / weave_p) * np.sin(2 * np.pi * yy / weave_p))
        + 0.03 * fractal_noise(n, n, 40 * k, rng, 3))[None]
    copper, pads, silk, drills = (np.zeros((n, n), np.uint8) for _ in range(4))
    _draw_traces(copper, pitch, k, rng)
    _draw_parts(pads, silk, pitch, k, rng)
    _draw_vias(copper, pads, drills, pitch, k, rng)
    under = mask_c * 1.35 + 12  # copper under the mask shows as a lighter tone of the mask colour
    for layer, color in ((copper, under), (pads, finish), (silk, _jitter((235, 235, 228), rng, 0.05)),
                         (drills, np.array((22, 20, 18), np.float32))):
        a = layer.astype(np.float32)[None] * np.float32(1 / 255)
        img = img + (planes_of(color) - img) * a
    return img + 2.5 * grain_noise(n, n, 0.6, rng)[None]


def _snap(v: np.ndarray, pitch: float) -> np.ndarray:
    return np.round(v / pitch) * pitch


def _draw_traces(layer: np.ndarray, pitch: float, k: float, rng: np.random.Generator) -> None:
    n = layer.shape[0]
    dirs = np.array([(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)], np.float32)
    for _ in range(rng.integers(4, 10)):
        width = max(1, round(rng.uniform(1.2, 3.5) * k))
        lanes = rng.integers(1, 7)  # buses: several parallel traces bending together
        start = _snap(rng.uniform(0, n, 2), pitch)
        path = [start]
        d = rng.integers(4)
        for _ in range(rng.integers(2, 6)):
            path.append(path[-1] + dirs[d] * pitch * rng.integers(1, 8))
            d = rng.choice(8, p=[0.2, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.05]) if d < 4 else rng.integers(4)
        pts = np.array(path, np.float32)
        normal = np.array((-(pts[1] - pts[0])[1], (pts[1] - pts[0])[0]), np.float32)
        normal /= max(float(np.linalg.norm(normal)), 1e-6)
        for lane in range(lanes):
            shifted = (pts + normal * lane * pitch * 0.5) * 16  # 4 fractional bits for sub-pixel lines
            cv2.polylines(layer, [shifted.astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)


def _draw_parts(pads: np.ndarray, silk: np.ndarray, pitch: float, k: float, rng: np.random.Generator) -> None:
    n = pads.shape[0]
    for _ in range(rng.integers(2, 7)):
        x, y = _snap(rng.uniform(0, n, 2), pitch)
        if rng.random() < 0.5:  # IC footprint: two rows of pads
            count, step = rng.integers(3, 9), pitch * 0.5
            pw, ph, gap = 0.3 * pitch, 0.7 * pitch, pitch * rng.uniform(1.5, 3)
            for i in range(count):
                for row in (0, 1):
                    px, py = x + i * step, y + row * (gap + ph)
                    cv2.rectangle(pads, (int(px), int(py)), (int(px + pw), int(py + ph)), 255, -1)
            x1, y1 = x + count * step, y + gap + 2 * ph
            cv2.rectangle(silk, (int(x - 2 * k), int(y + ph + 2 * k)), (int(x1), int(y1 - ph - 2 * k)), 255,
                          max(1, round(k)))
        else:  # two-terminal chip part (resistor/capacitor)
            pw, ph, gap = 0.55 * pitch, 0.7 * pitch, 0.6 * pitch
            horizontal = rng.random() < 0.5
            for i in (0, 1):
                px, py = (x + i * (pw + gap), y) if horizontal else (x, y + i * (pw + gap))
                w, h = (pw, ph) if horizontal else (ph, pw)
                cv2.rectangle(pads, (int(px), int(py)), (int(px + w), int(py + h)), 255, -1)
            label = "RCL"[rng.integers(3)] + str(rng.integers(1, 99))
            cv2.putText(silk, label, (int(x), int(y - 2 * k)), cv2.FONT_HERSHEY_SIMPLEX, 0.25 * k, 255,
                        max(1, round(0.8 * k)), cv2.LINE_AA)


def _draw_vias(copper: np.ndarray, pads: np.ndarray, drills: np.ndarray, pitch: float, k: float,
               rng: np.random.Generator) -> None:
    n = copper.shape[0]
    tented = rng.random() < 0.5  # tented vias stay under the mask; open ones show the finish
    for _ in range(rng.integers(3, 20)):
        c = _snap(rng.uniform(0, n, 2), pitch).astype(int)
        ring = max(2, round(rng.uniform(2.0, 3.5) * k))
        cv2.circle(copper if tented else pads, (int(c[0]), int(c[1])), ring, 255, -1, cv2.LINE_AA)
        cv2.circle(drills, (int(c[0]), int(c[1])), max(1, ring // 2), 255, -1, cv2.LINE_AA)


# --------------------------------------------------------------------------- normal variation


def _pose_jitter(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Crop the centre of the canvas with a small rotation, shift and scale (part placement)."""
    n = img.shape[0]
    angle = float(np.clip(rng.normal(0, 1.5), -4, 4))
    m = cv2.getRotationMatrix2D((n / 2, n / 2), angle, rng.uniform(0.97, 1.03))
    m[:, 2] += size / 2 - n / 2 + rng.uniform(-0.03, 0.03, 2) * size
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _lighting(planes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, white balance, a linear light gradient and an off-centre vignette; planes (3, H, W)."""
    h, w = planes.shape[1:]
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    a = rng.uniform(0, 2 * np.pi)
    cx, cy = (float(c) for c in rng.uniform(-0.5, 0.5, 2))  # python floats keep float32 arrays float32
    field = (1 + rng.uniform(0, 0.15) * (xx * math.cos(a) + yy * math.sin(a))
             - rng.uniform(0, 0.2) * ((xx - cx) ** 2 + (yy - cy) ** 2) / 2)
    gain = (rng.uniform(0.88, 1.1) * (1 + rng.normal(0, 0.02, 3))).astype(np.float32)
    return planes * field[None] * planes_of(gain)


def _sensor(img: np.ndarray, k: float, rng: np.random.Generator) -> np.ndarray:
    """Occasional slight defocus, then luminance-correlated sensor noise."""
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.8) * max(k, 0.5))
    h, w = img.shape[:2]
    sigma = rng.uniform(0.8, 3.0)
    luma = white_noise((h, w), rng) * np.float32(0.85 * sigma)  # mostly luminance noise ...
    return img + cv2.merge([luma, luma, luma]) + white_noise((h, w, 3), rng) * np.float32(0.45 * sigma)


_BUILDERS = {"metal": _metal, "textile": _textile, "tile": _tile, "pcb": _pcb}
