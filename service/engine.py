"""Inference engine: one Inspector, one dynamic batcher, and the image decoding in front of it.

Decoding happens in a small thread pool *before* an image is queued (the batcher's `prepare`
step), not in the batch worker: cv2 releases the GIL, so several images decode in parallel
while the single worker thread runs the model, a bad image is refused before it takes a batch
slot, and the event loop never decodes. The pool is bounded by the queue capacity, because
an item holds its queue slot while it decodes. After a batch the same pool makes the verdicts,
boxes and heatmaps when other work waits for the model (`Inspector.finish`), so the worker can
start the next batch; with nothing waiting the worker makes them itself (no extra hand-over).

Language path hooks (only when a language part is served, see service/describe.py): a task may
carry a frame key (camera_id, frame_id) or ask for evidence tokens; the batch call then captures
the defect model's output through the attached ``EvidenceTap`` and stores each keyed frame's
tokens in the frame cache, so Describe(FrameRef) reuses them. ``fast_busy`` tells the language
thread when fast-path work is queued or running, so it yields between decoder steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lineinspect import __version__
from lineinspect.errors import LineInspectError
from lineinspect.images import check_size, decode_image, encode_png, header_size
from lineinspect.service.batcher import Batcher, BatcherConfig, Priority
from lineinspect.service.config import ServerConfig
from lineinspect.service.metrics import ServiceMetrics
from lineinspect.vision.device_jpeg import DeviceJpegDecoder
from lineinspect.vision.inspector import FrameOutput
from lineinspect.vision.preprocess import Frame
from lineinspect.vision.result import Inspection

if TYPE_CHECKING:
    from lineinspect.service.describe import EvidenceTap, FrameTokenCache

log = logging.getLogger(__name__)


class InspectorLike(Protocol):
    """What the engine needs of `lineinspect.vision.inspector.Inspector`."""

    input_size: int  # model input side: frames may be decoded shrunk down to it, never below

    def run_batch(self, images: list[Frame]) -> list[FrameOutput]: ...

    def finish(self, out: FrameOutput, size: tuple[int, int], heatmap: bool = False) -> Inspection: ...

    def info(self) -> dict: ...


class InvalidImage(LineInspectError):
    """The image cannot be inspected (empty, corrupt, truncated, inconsistent raw pixels)."""


class ImageTooLarge(InvalidImage):
    """The image declares more pixels than the server accepts."""


# ------------------------------------------------------------------------------ image sources


@dataclass(frozen=True)
class EncodedImage:
    data: bytes  # JPEG, PNG, BMP, TIFF, WebP file bytes


@dataclass(frozen=True)
class RawPixels:
    pixels: bytes  # row-major, interleaved channels, RGB order
    height: int
    width: int
    channels: int  # 1, 3 or 4
    dtype: str  # "uint8" or "uint16"; anything else is refused with its name in the message


ImageSource = EncodedImage | RawPixels

_ITEMSIZE = {"uint8": 1, "uint16": 2}


def decode_source(source: ImageSource, max_pixels: int, name: str = "image", min_side: int | None = None,
                  device_jpeg: DeviceJpegDecoder | None = None) -> tuple[Frame, tuple[int, int]]:
    """Any image source -> (RGB uint8 (h, w, 3), the source's (H, W)); InvalidImage /
    ImageTooLarge say what is wrong. With `min_side`, a JPEG may decode shrunk (h, w < H, W),
    never below min_side a side (`images.jpeg_reduction`). With `device_jpeg`, a JPEG within the
    size limit decodes on its GPU (a CUDA tensor); what nvJPEG refuses decodes on the CPU."""
    if isinstance(source, RawPixels):
        image = _decode_raw(source, max_pixels, name)
        return image, image.shape[:2]
    data = source.data
    size = header_size(data) if data else None
    if size is not None:
        try:
            check_size(*size, name, max_pixels)
        except LineInspectError as exc:
            raise (ImageTooLarge if min(size) > 0 else InvalidImage)(str(exc)) from None
        if device_jpeg is not None:
            frame = device_jpeg.decode(data)
            if frame is not None:
                return frame, (size[1], size[0])
    try:
        image = decode_image(data, name, max_pixels, min_side=min_side)
    except LineInspectError as exc:
        raise InvalidImage(str(exc)) from None
    return image, (size[1], size[0]) if size is not None else image.shape[:2]


def _decode_raw(raw: RawPixels, max_pixels: int, name: str) -> np.ndarray:
    if raw.dtype not in _ITEMSIZE:
        raise InvalidImage(f"{name}: raw pixel type {raw.dtype!r} is not supported; send UINT8 or UINT16")
    if raw.channels not in (1, 3, 4):
        raise InvalidImage(f"{name}: raw image has {raw.channels} channels; send 1 (grey), 3 (RGB), 4 (RGBA)")
    if raw.height <= 0 or raw.width <= 0:
        raise InvalidImage(f"{name}: raw image declares an empty size {raw.width}x{raw.height}")
    try:
        check_size(raw.width, raw.height, name, max_pixels)
    except LineInspectError as exc:
        raise ImageTooLarge(str(exc)) from None
    expected = raw.height * raw.width * raw.channels * _ITEMSIZE[raw.dtype]
    if len(raw.pixels) != expected:
        raise InvalidImage(
            f"{name}: raw pixels are {len(raw.pixels)} bytes but {raw.width}x{raw.height}x{raw.channels} "
            f"{raw.dtype} needs {expected}; check height, width, channels and dtype"
        )
    array = np.frombuffer(raw.pixels, dtype="<u2" if raw.dtype == "uint16" else np.uint8)
    array = array.reshape(raw.height, raw.width, raw.channels)
    if array.dtype != np.uint8:
        array = (array >> 8).astype(np.uint8)
    if raw.channels == 1:
        return np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """(H, W) float map in [0, 1] -> 8-bit grey PNG."""
    return encode_png((np.clip(heatmap, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def device_jpeg_decoder(config: ServerConfig) -> DeviceJpegDecoder | None:
    """nvJPEG for JPEG frames where the model runs on a GPU (``jpeg_decode`` "auto" or "gpu");
    "gpu" where it cannot work is an error at start-up, "auto" falls back to the CPU."""
    if config.jpeg_decode == "cpu" or not config.device.startswith("cuda"):
        if config.jpeg_decode == "gpu":
            raise LineInspectError(f"server: --jpeg-decode gpu needs a CUDA device, the model runs on {config.device}")
        return None
    decoder = DeviceJpegDecoder.create(config.device)
    if decoder is None and config.jpeg_decode == "gpu":
        raise LineInspectError("server: --jpeg-decode gpu, but nvJPEG does not work here (see the log); "
                               "use --jpeg-decode cpu or auto")
    return decoder


# ------------------------------------------------------------------------------ engine


@dataclass(frozen=True)
class _Task:
    image: Frame  # RGB uint8 (h, w, 3), possibly decoded shrunk, on the host or (nvJPEG) the GPU
    size: tuple[int, int]  # (H, W) of the image as sent: heatmaps and boxes are in its pixels
    want_heatmap: bool
    frame_key: tuple[str, int] | None = None  # store this frame's evidence tokens under the key
    want_tokens: bool = False  # return the evidence tokens (Describe of an image)


@dataclass(frozen=True)
class _Output:
    frame: FrameOutput
    inspection: Inspection | None  # None: the worker left `finish` to the caller (work was waiting)
    height: int  # of the image as sent
    width: int
    tokens: Any = None  # (N, D) float16 evidence tokens when the task asked for them


@dataclass
class EngineResult:
    inspection: Inspection
    heatmap_png: bytes
    width: int
    height: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, decode, model, post, total
    batch_size: int = 0
    tokens: Any = None  # (N, D) evidence tokens, when requested with want_tokens


class InspectionEngine:
    """Owns the inspector, the decode pool and the batcher; the servicer only calls `inspect`."""

    def __init__(self, inspector: InspectorLike, config: ServerConfig, metrics: ServiceMetrics) -> None:
        self.inspector = inspector
        self.config = config
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="lineinspect-decode")
        self.device_jpeg = device_jpeg_decoder(config)
        self.batcher: Batcher[_Task, _Output] = Batcher(
            self._process,
            BatcherConfig(config.min_batch, config.max_batch, config.max_delay_ms, config.queue_size),
            metrics,
            name="inspect",
            prepare_executor=self._pool,
        )
        self.tap: EvidenceTap | None = None
        self.frame_cache: FrameTokenCache | None = None
        self._running_batches = 0  # batches in the worker now (read by the language thread)

    def attach_language(self, tap: EvidenceTap, frame_cache: FrameTokenCache) -> None:
        """Capture evidence tokens for keyed frames and for requests that ask for them."""
        self.tap, self.frame_cache = tap, frame_cache

    def fast_busy(self) -> bool:
        """True while fast-path (FAST or BULK) work waits or any batch runs: language work yields."""
        return (self._running_batches > 0 or self.batcher.depth(Priority.FAST) > 0
                or self.batcher.depth(Priority.BULK) > 0)

    async def start(self, warmup: bool = True) -> None:
        """Start the batcher; with `warmup`, run one small batch first so the first request
        does not pay for lazy initialisation."""
        await self.batcher.start()
        if warmup:  # on the batches' own thread: it owns the process's OpenMP team (vision.cpu_threads)
            t0 = time.perf_counter()
            blank = np.zeros((32, 32, 3), np.uint8)
            await self.batcher.run_on_worker(self.inspector.run_batch, [blank])
            log.info("model warm", extra={"warmup_ms": round((time.perf_counter() - t0) * 1000, 1)})

    def drain(self) -> None:
        """Refuse new work (ShuttingDown); queued work still runs."""
        self.batcher.drain()

    async def stop(self, timeout: float) -> None:
        await self.batcher.stop(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def inspect(
        self,
        source: ImageSource,
        *,
        want_heatmap: bool = False,
        priority: Priority = Priority.FAST,
        timeout_s: float | None = None,
        wait: bool = False,
        received: float | None = None,
        name: str = "image",
        frame_key: tuple[str, int] | None = None,
        want_tokens: bool = False,
    ) -> EngineResult:
        """Decode, queue, run and post-process one image.

        `timeout_s` is the time left to the caller's deadline; `received` the perf_counter
        time the request arrived (the start of total_ms). With a language part attached,
        `frame_key` stores the frame's evidence tokens in the frame cache and `want_tokens`
        returns them in the result. Raises the batcher's errors (Overloaded, ShuttingDown,
        DeadlineExpired), InvalidImage, or the model's error.
        """
        if self.tap is None:
            frame_key, want_tokens = None, False
        received = time.perf_counter() if received is None else received
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        max_pixels = self.config.max_image_pixels

        def prepare(src: ImageSource) -> _Task:
            image, size = decode_source(src, max_pixels, name, min_side=self.inspector.input_size,
                                        device_jpeg=self.device_jpeg)
            return _Task(image, size, want_heatmap, frame_key, want_tokens)

        done = await self.batcher.submit(
            source, priority=priority, deadline=deadline, prepare=prepare, wait=wait
        )
        output: _Output = done.value
        t0 = time.perf_counter()
        inspection, png = output.inspection, b""
        worker_post_ms = inspection.timings_ms.get("post", 0.0) if inspection is not None else 0.0
        if inspection is None or want_heatmap:
            inspection, png = await loop.run_in_executor(self._pool, self._finish, output, want_heatmap)
        encode_ms = (time.perf_counter() - t0) * 1000
        timings = {
            "queue": done.queued_s * 1000,
            "decode": done.prepare_s * 1000,
            "model": done.run_s * 1000,
            "post": worker_post_ms + encode_ms,  # in the worker, and here (pool hand-over included)
            "total": (time.perf_counter() - received) * 1000,
        }
        for stage, ms in timings.items():
            self.metrics.observe_stage(stage, ms / 1000)
        return EngineResult(inspection, png, output.width, output.height, timings, done.batch_size, output.tokens)

    def _finish(self, output: _Output, want_heatmap: bool) -> tuple[Inspection, bytes]:
        """In the pool: the frame's Inspection (unless the worker made it) and its heatmap PNG."""
        inspection = output.inspection
        if inspection is None:
            inspection = self.inspector.finish(output.frame, (output.height, output.width), want_heatmap)
        png = heatmap_png(inspection.heatmap) if want_heatmap and inspection.heatmap is not None else b""
        return inspection, png

    def _process(self, tasks: list[_Task]) -> list[_Output | BaseException]:
        """Runs in the batch worker thread: one model call for the batch. If the batch call
        fails, each image is retried alone so one bad item cannot fail the others."""
        self._running_batches += 1
        try:
            return self._process_batch(tasks)
        finally:
            self._running_batches -= 1

    def _process_batch(self, tasks: list[_Task]) -> list[_Output | BaseException]:
        try:
            results: list[FrameOutput | BaseException]
            results, tokens = self._inspect(tasks)
        except Exception as exc:
            if len(tasks) == 1:
                return [exc]
            log.warning("batch failed; retrying its images one by one", extra={"error": repr(exc)})
            results, rows = [], []
            for task in tasks:
                try:
                    one, one_tokens = self._inspect([task])
                    results.extend(one)
                    rows.append(one_tokens[0] if one_tokens is not None else None)
                except Exception as item_exc:
                    results.append(item_exc)
                    rows.append(None)
            tokens = rows
        if len(results) != len(tasks):
            raise RuntimeError(f"inspector returned {len(results)} results for {len(tasks)} images")
        # With work waiting, the verdicts, boxes and heatmaps are left to the callers (in the pool,
        # in parallel), so the device gets its next batch sooner; otherwise they are made here,
        # which spares a lone camera a thread hand-over.
        defer = self.batcher.depth(Priority.FAST) > 0 or self.batcher.depth(Priority.BULK) > 0
        outputs: list[_Output | BaseException] = []
        for i, (r, t) in enumerate(zip(results, tasks, strict=True)):
            if isinstance(r, BaseException):
                outputs.append(r)
                continue
            row = tokens[i].clone() if tokens is not None and tokens[i] is not None else None  # own memory
            if row is not None and t.frame_key is not None and self.frame_cache is not None:
                self.frame_cache.put(t.frame_key, row)
            try:
                inspection = None if defer else self.inspector.finish(r, t.size, t.want_heatmap)
            except Exception as exc:
                outputs.append(exc)
                continue
            outputs.append(_Output(r, inspection, t.size[0], t.size[1], row if t.want_tokens else None))
        return outputs

    def _inspect(self, tasks: list[_Task]) -> tuple[list[FrameOutput], Any]:
        """One model call; with a tap and a task that needs them, also the evidence tokens (B, N, D)."""
        images = [t.image for t in tasks]
        if self.tap is None or not any(t.frame_key is not None or t.want_tokens for t in tasks):
            return list(self.inspector.run_batch(images)), None
        with self.tap.capture() as outputs:
            results = list(self.inspector.run_batch(images))
        return results, self.tap.tokens(outputs)

    def info(self) -> dict:
        """The inspector's info plus the server's batching settings."""
        info = dict(self.inspector.info())
        info["batcher"] = {
            "min_batch": self.config.min_batch,
            "max_batch": self.config.max_batch,
            "max_delay_ms": self.config.max_delay_ms,
            "queue_capacity": self.config.queue_size,
        }
        info["jpeg_decode"] = "gpu" if self.device_jpeg is not None else "cpu"
        info["server_version"] = __version__
        info["max_message_bytes"] = self.config.max_message_bytes
        return info

