"""Generic defect synthesis for training on good images only (batched torch, CPU or GPU).

No named defect type is drawn here: shapes come from fractal noise blobs, thin random strokes
and ellipses; their content from another image of the batch, a noise texture, a photometric
change of the image itself, a blurred or shifted copy. The model learns "this region does not
belong to the surface" rather than any particular defect, which is what lets it find defect
kinds nobody predicted.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def fractal_noise(b: int, size: int, generator: torch.Generator, device: torch.device,
                  octaves: tuple[int, ...] = (2, 4, 8, 16)) -> torch.Tensor:
    """Smooth value noise (B, 1, size, size), roughly zero mean, unit scale."""
    out = torch.zeros(b, 1, size, size, device=device)
    if b == 0:  # a batch without good images (a fully labelled line) pastes nothing
        return out
    for i, cells in enumerate(octaves):
        grid = torch.randn(b, 1, cells + 1, cells + 1, generator=generator, device="cpu").to(device)
        out += F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True) / (1.6**i)
    return out / out.flatten(1).std(1).clamp_min(1e-6).view(b, 1, 1, 1)


def blob_masks(b: int, size: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise-thresholded blobs confined to a random window. (B,1,S,S) in {0,1}."""
    octaves = [(1, 2, 4, 8), (2, 4, 8, 16), (4, 8, 16, 32)][int(torch.randint(3, (1,), generator=g))]
    noise = fractal_noise(b, size, g, device, octaves)
    thr = torch.empty(b, 1, 1, 1).uniform_(0.3, 1.5, generator=g).to(device)  # in noise std units
    cy, cx = (torch.rand(2, b, generator=g) * size).to(device)
    r = (torch.rand(b, generator=g) * 0.3 + 0.08).to(device) * size
    yy, xx = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    window = ((yy - cy.view(b, 1, 1)) ** 2 + (xx - cx.view(b, 1, 1)) ** 2) < r.view(b, 1, 1) ** 2
    return (noise > thr).float() * window.unsqueeze(1).float()


def stroke_masks(b: int, size: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Thin random polylines (scratch/crack-like geometry without being either). (B,1,S,S)."""
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
    masks = np.zeros((b, size, size), np.uint8)
    for i in range(b):
        n = int(rng.integers(2, 7))
        steps = rng.normal(0, 0.5, n).cumsum() + rng.uniform(0, 2 * math.pi)
        lengths = rng.uniform(0.03, 0.2, n) * size
        pts = rng.uniform(0, size, 2) + np.cumsum(np.stack([np.cos(steps), np.sin(steps)], 1) * lengths[:, None], 0)
        pts = np.vstack([pts[:1] * 0 + pts[0] - (pts[1] - pts[0]), pts]) if n > 1 else pts
        width = max(1, int(round(rng.uniform(0.5, size / 50))))
        cv2.polylines(masks[i], [pts.round().astype(np.int32)], False, 1, width)
    return torch.from_numpy(masks).to(device).unsqueeze(1).float()


def rotated_coords(size: int, centre: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (B, S, S) along and across a direction: centre (B, 2) as (y, x), angle (B,)
    radians from the x axis towards y."""
    b, device = len(angle), angle.device
    yy, xx = torch.meshgrid(torch.arange(size, device=device).float(),
                            torch.arange(size, device=device).float(), indexing="ij")
    dy, dx = yy - centre[:, 0].view(b, 1, 1), xx - centre[:, 1].view(b, 1, 1)
    cos, sin = angle.cos().view(b, 1, 1), angle.sin().view(b, 1, 1)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def ellipse_masks(b: int, size: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    c = (torch.rand(b, 2, generator=g) * size).to(device)
    ax = ((torch.rand(b, 2, generator=g) * 0.15 + 0.015) * size).to(device)
    th = (torch.rand(b, generator=g) * math.pi).to(device)
    u, v = rotated_coords(size, c, th)
    inside = (u / ax[:, 0].view(b, 1, 1)) ** 2 + (v / ax[:, 1].view(b, 1, 1)) ** 2 < 1
    return inside.unsqueeze(1).float()


def fill_sources(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each image, a same-size 'foreign' content to blend in. images (B,3,S,S) in [0,1]."""
    b, _, s, _ = images.shape
    dev = images.device
    kind = torch.randint(5, (b,), generator=g).to(dev).view(b, 1, 1, 1)
    # 0: another image of the batch, flipped and colour-shifted
    other = images[torch.roll(torch.arange(b), 1)].flip(-1)
    other = other * torch.empty(b, 3, 1, 1).uniform_(0.6, 1.4, generator=g).to(dev)
    # 1: coloured noise texture
    tex = torch.cat([fractal_noise(b, s, g, dev, (8, 16, 32, 64)) for _ in range(3)], 1)
    tex = 0.5 + tex * torch.empty(b, 1, 1, 1).uniform_(0.05, 0.3, generator=g).to(dev)
    tex = tex + torch.empty(b, 3, 1, 1).uniform_(-0.3, 0.3, generator=g).to(dev)
    # 2: photometric change of the image itself (darker/brighter/tinted: stains, burns)
    gain = torch.empty(b, 1, 1, 1).uniform_(0.3, 1.8, generator=g).to(dev)
    tint = torch.empty(b, 3, 1, 1).uniform_(-0.15, 0.15, generator=g).to(dev)
    photo = images * gain + tint
    # 3: blurred copy (smudges, loss of texture)
    blurred = F.avg_pool2d(images, 9, 1, 4, count_include_pad=False)
    # 4: shifted copy (misplaced or displaced structure)
    shift = int(torch.randint(4, max(5, s // 4), (1,), generator=g))
    shifted = torch.roll(images, shifts=(shift, -shift), dims=(-2, -1))
    out = torch.where(kind == 0, other, tex)
    out = torch.where(kind == 2, photo, out)
    out = torch.where(kind == 3, blurred, out)
    out = torch.where(kind == 4, shifted, out)
    return out.clamp(0, 1)


# A streak's label: where its shading exceeds this (about 6 grey levels of 255) and its profile is
# more than 0.3 of its peak. Other kinds are labelled from 0.06: their edges make them visible.
STREAK_VISIBLE = 0.025


def dominant_angle(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's texture direction (B,) in radians (image axes, x right, y down), the way its grain,
    rolling or brushing marks run, and how clearly (B,) coherence in [0, 1] (0: no direction), from
    the mean structure tensor of the grey image at a quarter of its resolution (pixel noise has none)."""
    grey = F.avg_pool2d(images.mean(1, keepdim=True), 4)
    gx = grey[..., 1:-1, 2:] - grey[..., 1:-1, :-2]
    gy = grey[..., 2:, 1:-1] - grey[..., :-2, 1:-1]
    jxx, jyy, jxy = (gx * gx).mean((1, 2, 3)), (gy * gy).mean((1, 2, 3)), (gx * gy).mean((1, 2, 3))
    gradient = 0.5 * torch.atan2(2 * jxy, jxx - jyy)  # the gradients' main direction, across the grain
    coherence = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy).clamp_min(1e-12)
    return gradient + math.pi / 2, coherence


def streak_defects(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Faint, soft, elongated shading along the surface's own direction where it has one (rolled-in
    marks, roll and die lines, streaks on rolled, drawn or brushed surfaces): 9 to 31 grey levels at the
    centre, fading out, no edge. images (B,3,S,S) in [0,1] -> (images, visible change (B,1,S,S))."""
    b, _, s, _ = images.shape
    dev = images.device
    along, coherence = dominant_angle(images)
    follow = (torch.rand(b, generator=g).to(dev) < 0.75) & (coherence > 0.05)
    angle = torch.where(follow, along + torch.randn(b, generator=g).to(dev) * math.radians(8),
                        torch.rand(b, generator=g).to(dev) * math.pi)
    c = ((torch.rand(b, 2, generator=g) * 0.7 + 0.15) * s).to(dev)
    length = (torch.rand(b, generator=g) * 0.4 + 0.15).to(dev) * s  # semi-axes
    width = (length / (torch.rand(b, generator=g) * 3.5 + 1.5).to(dev)).clamp_min(1.5)
    u, v = rotated_coords(s, c, angle)
    u, v = u / length.view(b, 1, 1), v / width.view(b, 1, 1)
    profile = torch.exp(-2 * (u**2 + v**2)).unsqueeze(1)  # (B,1,S,S), 1 at the centre
    amount = torch.empty(b, 1, 1, 1).uniform_(0.035, 0.12, generator=g).to(dev)  # 9-31 grey levels at the centre
    sign = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.7, -1.0, 1.0).to(dev)  # mostly darker
    out = (images + sign * amount * profile).clamp(0, 1)
    changed = ((out - images).abs().amax(1, keepdim=True) > STREAK_VISIBLE) & (profile > 0.3)
    return out, changed.float()


def synthesize_defects(images: torch.Tensor, g: torch.Generator, p_defect: float = 0.5, p_streak: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste generic defects on a random subset of good images; a share p_streak of them are faint
    streaks (``streak_defects``) instead.

    images: (B,3,S,S) in [0,1]. Returns (images, masks (B,1,S,S) in {0,1}, is_defect (B,) bool).
    """
    b, _, s, _ = images.shape
    dev = images.device
    shape_kind = torch.randint(3, (b,), generator=g).to(dev).view(b, 1, 1, 1)
    mask = torch.where(shape_kind == 0, blob_masks(b, s, g, dev), ellipse_masks(b, s, g, dev))
    mask = torch.where(shape_kind == 2, stroke_masks(b, s, g, dev), mask)
    empty = (mask.flatten(1).sum(1) < 4).view(b, 1, 1, 1)
    mask = torch.where(empty, ellipse_masks(b, s, g, dev), mask)
    defect = (torch.rand(b, generator=g) < p_defect).to(dev)
    mask = mask * defect.view(b, 1, 1, 1).float()
    # Soft edges on some, opacity from subtle to opaque.
    soft = F.avg_pool2d(mask, 5, 1, 2, count_include_pad=False)
    use_soft = (torch.rand(b, generator=g) < 0.5).to(dev).view(b, 1, 1, 1)
    alpha = torch.where(use_soft, soft, mask) * torch.empty(b, 1, 1, 1).uniform_(0.35, 1.0, generator=g).to(dev)
    out = images * (1 - alpha) + fill_sources(images, g) * alpha
    # Label only what visibly changed: tiny differences are not defects.
    changed = ((out - images).abs().amax(1, keepdim=True) > 0.06).float() * (mask > 0).float()
    if p_streak > 0:  # drawn only when asked, so that p_streak=0 keeps the random stream as it was
        streaky = ((torch.rand(b, generator=g) < p_streak).to(dev) & defect).view(b, 1, 1, 1)
        streaks, streak_changed = streak_defects(images, g)
        out, changed = torch.where(streaky, streaks, out), torch.where(streaky, streak_changed, changed)
    has = changed.flatten(1).sum(1) >= 4
    return out, changed, has
