"""Images in, model batch out, resized with OpenCV's filters: area when shrinking, bilinear when enlarging.

`to_batch` resizes on the CPU with OpenCV and scales on the device: the eager path, and what training
sees (`resize_rgb`). `frames_into` copies the uint8 frames to the device as they are and resizes them
there with the same filters written as two small matrix products (`resize_weights`), so the CUDA graph
path sees what training saw (within OpenCV's rounding to uint8) while the CPU only decodes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)  # the model's input normalisation per RGB channel (ImageNet's)
STD = (0.229, 0.224, 0.225)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H,W,3) -> (size,size,3). The whole frame is used: a line camera's framing is fixed."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


Frame = np.ndarray | torch.Tensor  # RGB uint8 (H, W, 3): host array, or a device tensor (vision.device_jpeg)


def host_frame(image: Frame) -> np.ndarray:
    """A frame as a host array (a device frame is copied back)."""
    return image.cpu().numpy() if isinstance(image, torch.Tensor) else image


def to_batch(images: list[Frame], size: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """list of RGB uint8 (H,W,3) -> (B,3,size,size) float in [0,1] on `device`."""
    stacked = np.stack([resize_rgb(host_frame(im), size) for im in images])  # (B, S, S, 3) uint8
    t = torch.from_numpy(stacked)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t.permute(0, 3, 1, 2).to(dtype).div_(255.0)


def resize_mode(height: int, width: int, size: int) -> str:
    """The per-axis filter `resize_rgb` applies to a (height, width) image, in `resize_weights` terms.

    OpenCV's area filter is exact box averaging only when neither axis enlarges; otherwise it falls
    back to a bilinear variant of its own on both axes ("area_linear").
    """
    if height <= size and width <= size:
        return "linear"
    return "area" if height >= size and width >= size else "area_linear"


def resize_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) float64 weights of OpenCV's 1-D resize from n_in to n_out pixels: "area"
    (INTER_AREA shrinking: each output pixel averages the input it covers, partial pixels by
    their overlap), "linear" (INTER_LINEAR, half-pixel centres) or "area_linear" (see resize_mode)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    if mode == "area":
        for i in range(n_out):
            lo, hi = i * scale, min((i + 1) * scale, n_in)
            j = np.arange(math.floor(lo), math.ceil(hi))
            w[i, j] = (np.minimum(j + 1, hi) - np.maximum(j, lo)) / (hi - lo)
        return w
    i = np.arange(n_out)
    if mode == "linear":
        start = np.floor((i + 0.5) * scale - 0.5)
        frac = (i + 0.5) * scale - 0.5 - start
    else:
        start = np.floor(i * scale)
        frac = (i + 1) - (start + 1) / scale
        frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    frac = np.where((start < 0) | (start >= n_in - 1), 0.0, frac)  # OpenCV's borders: repeat the edge
    start = np.clip(start, 0, n_in - 1).astype(np.int64)
    np.add.at(w, (i, start), 1 - frac)
    np.add.at(w, (i, np.minimum(start + 1, n_in - 1)), frac)
    return w


@lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, mode: str, gain: float, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """resize_weights * gain as a `dtype` tensor on `device`, made once per shape (also serves
    `vision.upsampling`: "linear" is bilinear resizing with half-pixel centres, as F.interpolate's)."""
    with torch.inference_mode(False):  # cached: it must serve calls outside inference mode too
        return torch.from_numpy(resize_weights(n_in, n_out, mode) * gain).to(device, dtype)


def frames_into(images: list[Frame], out: torch.Tensor) -> None:
    """RGB uint8 (H,W,3) frames -> out[:len(images)], (B,3,S,S) in [0,1], resized on out's device
    with `resize_rgb`'s filters.

    Frames of one size travel together: one (pinned, on CUDA) host buffer, one copy to the device,
    two matrix products. The copy is asynchronous; the pinned buffer stays reserved until it is done.
    Frames already on out's device (decoded there) are stacked there and skip the copy.
    """
    size = out.shape[-1]
    pinned = out.device.type == "cuda"
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for i, image in enumerate(images):
        on_device = isinstance(image, torch.Tensor) and image.device == out.device
        groups.setdefault((*image.shape[:2], on_device), []).append(i)
    for (h, w, on_device), rows in groups.items():
        if on_device:
            x = torch.stack([images[i] for i in rows]).permute(0, 3, 1, 2)
        else:
            host = torch.empty((len(rows), h, w, 3), dtype=torch.uint8, pin_memory=pinned)
            np.stack([host_frame(images[i]) for i in rows], out=host.numpy())
            x = host.to(out.device, non_blocking=pinned).permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)  # (k, 3, h, w)
        if (h, w) == (size, size):
            x = x.div_(255.0)
        else:
            mode = resize_mode(h, w, size)
            rows_matrix = resize_matrix(h, size, mode, 1 / 255, out.device)  # (S, h), also scales to [0, 1]
            cols_matrix = resize_matrix(w, size, mode, 1.0, out.device)  # (S, w)
            x = rows_matrix @ (x @ cols_matrix.T)
        if rows[-1] - rows[0] + 1 == len(rows):  # one size per batch, the usual case
            out[rows[0] : rows[-1] + 1] = x
        else:
            out[torch.tensor(rows)] = x.to(out.dtype)
