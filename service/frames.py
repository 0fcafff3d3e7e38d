"""Frame sources for camera ingest: a capture device, an RTSP/HTTP stream, a video file, or a
sorted folder of images.

Every source yields RGB ``uint8`` frames of shape (H, W, 3). ``read()`` returns ``None`` at the
clean end of a finite source (a video file or an image folder that is not looped) and raises
:class:`SourceLost` when a live source (device, network stream) stops delivering; the caller
decides whether to reopen it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.images import read_image, to_rgb

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".ts"})


class SourceLost(Exception):
    """A live source stopped delivering frames (camera unplugged, stream down)."""


class FrameSource(Protocol):
    name: str
    live: bool  # True: a failure is transient and the source may be reopened
    fps: float | None  # the source's native frame rate, when it has one

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (optionally recursive), sorted by their path relative to it."""
    pattern = "**/*" if recursive else "*"
    files = [p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


class ImageFolderSource:
    """The images of a folder in sorted order, once or looped. Unreadable files are skipped with
    a warning on stderr (a camera feed keeps going past one bad frame)."""

    live = False
    fps: float | None = None

    def __init__(self, folder: Path, loop: bool = False) -> None:
        self.name = str(folder)
        self.files = list_images(folder)
        if not self.files:
            raise LineInspectError(
                f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder; "
                "point --source at a folder of images, a video file, a device index or an rtsp:// URL"
            )
        self.loop = loop
        self.skipped = 0
        self._order = self._cycle()

    def _cycle(self) -> Iterator[Path]:
        while True:
            yield from self.files
            if not self.loop:
                return

    def read(self) -> np.ndarray | None:
        failures = 0
        for path in self._order:
            try:
                return read_image(path)
            except LineInspectError as exc:
                self.skipped += 1
                failures += 1
                print(f"warning: skipping frame: {exc}", file=sys.stderr)
                if failures >= len(self.files):
                    raise LineInspectError(f"{self.name}: none of the images in this folder decode") from exc
        return None

    def close(self) -> None:
        self._order = iter(())


class CaptureSource:
    """cv2.VideoCapture over a device index, a network URL or a video file."""

    def __init__(self, target: int | str, live: bool, loop: bool = False) -> None:
        self.target = target
        self.name = f"camera {target}" if isinstance(target, int) else str(target)
        self.live = live
        self.loop = loop and not live
        self.cap = cv2.VideoCapture(target)
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceLost(f"{self.name}: cannot open")
        fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.0 < fps < 1000.0 else None

    def read(self) -> np.ndarray | None:
        ok, frame = self.cap.read()
        if ok and frame is not None:
            return to_rgb(frame, self.name)
        if self.live:
            raise SourceLost(f"{self.name}: no frame (device unplugged or stream down)")
        if self.loop and self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            ok, frame = self.cap.read()
            if ok and frame is not None:
                return to_rgb(frame, self.name)
        return None

    def close(self) -> None:
        self.cap.release()


@dataclass(frozen=True)
class SourceSpec:
    """A parsed --source value; :meth:`open` may be called again to reconnect."""

    raw: str
    loop: bool = False

    @property
    def kind(self) -> str:
        if self.raw.isdigit():
            return "device"
        if "://" in self.raw:
            return "url"
        path = Path(self.raw)
        if path.is_dir():
            return "folder"
        if path.is_file():
            return "video"
        return "missing"

    @property
    def live(self) -> bool:
        return self.kind in ("device", "url")

    def open(self) -> FrameSource:
        """Open the source, or raise LineInspectError (not found, not a video) / SourceLost
        (a live source that is not delivering right now)."""
        kind = self.kind
        if kind == "folder":
            return ImageFolderSource(Path(self.raw), self.loop)
        if kind == "device":
            return CaptureSource(int(self.raw), live=True)
        if kind == "url":
            return CaptureSource(self.raw, live=True)
        if kind == "video":
            if Path(self.raw).suffix.lower() in IMAGE_SUFFIXES:
                raise LineInspectError(
                    f"{self.raw}: a single image is not a stream; put it in a folder and pass the folder"
                )
            try:
                return CaptureSource(self.raw, live=False, loop=self.loop)
            except SourceLost:
                raise LineInspectError(
                    f"{self.raw}: OpenCV cannot read this file as a video; use an MP4/AVI file, "
                    "a folder of images, a device index (0) or an rtsp:// URL"
                ) from None
        raise LineInspectError(
            f"{self.raw}: no such file or folder; --source takes a device index (0), an rtsp:// "
            "or http:// URL, a video file, or a folder of images"
        )


def open_source(raw: str, loop: bool = False) -> tuple[SourceSpec, FrameSource]:
    """Parse and open a --source value. A source that cannot be opened at start is an error
    (usually a typo or a missing camera); losing it later is handled by reconnecting."""
    spec = SourceSpec(raw, loop)
    try:
        return spec, spec.open()
    except SourceLost:
        hint = (
            "check the device index, that no other program holds the camera, and permissions on /dev/video*"
            if spec.kind == "device"
            else "check the URL, credentials and that the camera is reachable"
        )
        raise LineInspectError(f"{raw}: cannot open the {spec.kind} source; {hint}") from None
