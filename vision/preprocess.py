"""Images in, model batch out: resize on the CPU with OpenCV (area filter), scale on the device."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H,W,3) -> (size,size,3). The whole frame is used: a line camera's framing is fixed."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_batch(images: list[np.ndarray], size: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """list of RGB uint8 (H,W,3) -> (B,3,size,size) float in [0,1] on `device`."""
    stacked = np.stack([resize_rgb(im, size) for im in images])  # (B, S, S, 3) uint8
    t = torch.from_numpy(stacked)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t.permute(0, 3, 1, 2).to(dtype).div_(255.0)
