"""Image decoding shared by the data loaders, the CLI and the server.

Every image leaves here as an RGB ``uint8`` array of shape (H, W, 3), whatever it was stored
as (grey, grey+alpha, BGR, BGRA, 16-bit). Dimensions are read from the file header *before*
decoding, so a small file that declares a gigantic image is refused without allocating it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from lineinspect.errors import LineInspectError

MAX_PIXELS = 40_000_000  # ~ a 7000x5700 frame; larger is refused before decoding
MAX_SIDE = 16_384


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG or JPEG header, or None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            i += 2 + length
    return None


def check_size(width: int, height: int, source: str, max_pixels: int = MAX_PIXELS) -> None:
    if width <= 0 or height <= 0:
        raise LineInspectError(f"{source}: image declares an empty size {width}x{height}")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > max_pixels:
        raise LineInspectError(
            f"{source}: image is {width}x{height} pixels, above the limit of "
            f"{max_pixels} pixels / {MAX_SIDE} per side; resize it before sending"
        )


def to_rgb(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Any decoded array (H,W), (H,W,1), (H,W,3) BGR or (H,W,4) BGRA, uint8 or uint16 -> RGB uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise LineInspectError(f"{source}: unsupported pixel type {image.dtype}; use 8- or 16-bit images")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise LineInspectError(f"{source}: unsupported image shape {image.shape}; expected 1, 3 or 4 channels")


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(size: tuple[int, int] | None, data: bytes, min_side: int | None) -> int:
    """The largest factor (1, 2, 4 or 8) by which libjpeg may shrink this JPEG while decoding and
    keep both sides >= min_side. Shrinking in the DCT domain skips most of the decoding work: a
    640x480 frame bound for a 224 px model decodes at 320x240 in about two thirds of the time."""
    if min_side is None or size is None or data[:2] != b"\xff\xd8":
        return 1
    return next((r for r in (8, 4, 2) if min(size) // r >= min_side), 1)


def jpeg_truncated(data: bytes) -> bool:
    """A JPEG without its end-of-image marker (trailing zero padding allowed): decoders fill the
    missing scan with grey and only warn, and a verdict on half an image is wrong."""
    return data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00").endswith(b"\xff\xd9")


def decode_image(data: bytes, source: str = "image", max_pixels: int = MAX_PIXELS,
                 min_side: int | None = None) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, BMP, TIFF, ...) -> RGB uint8 (H, W, 3), or a clear LineInspectError.

    With `min_side`, a JPEG may come back shrunk by 2, 4 or 8 (never below min_side pixels a
    side): for callers that resize to a smaller model input anyway."""
    if not data:
        raise LineInspectError(f"{source}: empty image (0 bytes)")
    size = header_size(data)
    if size is not None:
        check_size(*size, source, max_pixels)
    factor = jpeg_reduction(size, data, min_side)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor] if factor > 1 else cv2.IMREAD_UNCHANGED)
    if image is None:
        raise LineInspectError(f"{source}: not a decodable image (corrupt, truncated or unknown format)")
    check_size(image.shape[1], image.shape[0], source, max_pixels)
    if jpeg_truncated(data):
        raise LineInspectError(f"{source}: JPEG is truncated (no end-of-image marker); resend the whole file")
    return to_rgb(image, source)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LineInspectError(f"{path}: cannot read image ({exc.strerror or exc})") from exc
    return decode_image(data, str(path), max_pixels)


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask (any non-zero pixel is defect) as bool (H, W); checked against `shape`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LineInspectError(f"{path}: cannot read mask ({exc.strerror or exc})") from exc
    if not data:
        raise LineInspectError(f"{path}: mask file is empty; re-export it as a PNG")
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise LineInspectError(f"{path}: mask is not a readable image; re-export it as a PNG")
    if shape is not None and mask.shape != tuple(shape):
        raise LineInspectError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}"
        )
    return mask > 0


def encode_png(image: np.ndarray) -> bytes:
    """RGB (H,W,3) or grey (H,W) uint8 -> PNG bytes."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise LineInspectError("could not encode PNG")
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """RGB (H,W,3) uint8 -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise LineInspectError("could not encode JPEG")
    return buf.tobytes()
