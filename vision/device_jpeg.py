"""JPEG frames decoded on the GPU (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``).

For the CUDA serving path: a 640x480 camera JPEG costs 1.4 ms to decode on an H200 host's CPU and
0.23 ms through nvJPEG (``bench/jpeg_decode.py``), and the decoded frame is already where the model
runs, so the host-to-device copy of its pixels disappears too. The frame comes back as an (H, W, 3)
uint8 view of a CUDA tensor, which `vision.preprocess.frames_into` resizes on the device.

Anything nvJPEG refuses (not a JPEG, a corrupt or truncated file, an encoding it lacks) returns None
and the caller decodes on the CPU, whose error messages name what is wrong with the file.

Streams: each calling thread decodes on a stream of its own and waits for it before returning, so a
frame is complete when another thread's model call reads it. The frame's memory cannot be handed to
a later decode while that call still reads it: the model call synchronises its stream before the
frame is released (`CudaGraphRunner.run`).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from lineinspect.images import jpeg_truncated

log = logging.getLogger(__name__)

JPEG_SIGNATURE = b"\xff\xd8\xff"


class DeviceJpegDecoder:
    """Decodes JPEG bytes to RGB frames on one CUDA device. Build it with `create`."""

    def __init__(self, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = device
        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        self._local = threading.local()

    @classmethod
    def create(cls, device: torch.device | str) -> DeviceJpegDecoder | None:
        """A decoder for `device`, or None (with the reason logged) where there is no CUDA device,
        no torchvision with nvJPEG, or a probe frame does not decode to what OpenCV decodes."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        try:
            decoder = cls(device)
            decoder.probe()
        except Exception as exc:  # an old torchvision, a build without nvJPEG, a driver without it
            log.warning("JPEG frames decode on the CPU: nvJPEG is not usable here (%r)", exc)
            return None
        return decoder

    def probe(self) -> None:
        """Decode a small test JPEG and compare it with OpenCV's decode (raises when they differ)."""
        import cv2

        yy, xx = np.mgrid[0:48, 0:64]  # smooth colour ramps: decoders differ in how they upsample noisy chroma
        image = np.stack([xx * 4, yy * 5, 255 - xx * 2 - yy * 2], -1).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        frame = self.decode(buf.tobytes())
        if frame is None:
            raise RuntimeError("nvJPEG refused a test JPEG")
        reference = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        gap = np.abs(frame.cpu().numpy().astype(np.int16) - reference).mean()
        if gap > 3.0:
            raise RuntimeError(f"nvJPEG's test frame differs from OpenCV's by {gap:.2f} grey levels on average")

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def decode(self, data: bytes) -> torch.Tensor | None:
        """JPEG bytes -> (H, W, 3) uint8 RGB view of a CUDA tensor, complete when returned; None
        when the bytes are not a JPEG nvJPEG decodes (the caller then decodes on the CPU)."""
        if not data.startswith(JPEG_SIGNATURE) or jpeg_truncated(data):  # nvJPEG decodes a truncated file silently
            return None
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        stream = self._stream()
        try:
            with torch.cuda.stream(stream):
                chw = self._decode_jpeg(encoded, mode=self._rgb, device=self.device)
            stream.synchronize()
        except RuntimeError:
            return None
        if chw.ndim != 3 or chw.shape[0] != 3:
            return None
        return chw.permute(1, 2, 0)
