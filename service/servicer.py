"""The gRPC servicer: converts messages to domain objects and back, delegates to the engine.

Errors map to statuses once, here (`classify`): bad images -> INVALID_ARGUMENT, a full queue
-> RESOURCE_EXHAUSTED, a passed deadline -> DEADLINE_EXCEEDED, draining -> UNAVAILABLE, any
other failure -> INTERNAL (logged with its traceback). On streams the same facts become a
per-frame Drop (InspectStream) or a per-item Error (Audit), and the stream goes on.

Describe streams a TextChunk per generated token (service/describe.py batches the requests);
a FrameRef to a frame not in the cache is NOT_FOUND, and a server without a language part
answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc

from lineinspect.errors import LineInspectError
from lineinspect.service.batcher import DeadlineExpired, Overloaded, Priority, ShuttingDown
from lineinspect.service.describe import FrameNotCached
from lineinspect.service.engine import (
    EncodedImage,
    EngineResult,
    ImageSource,
    ImageTooLarge,
    InspectionEngine,
    InvalidImage,
    RawPixels,
)
from lineinspect.service.metrics import ServiceMetrics
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from lineinspect.service.describe import DescribeEngine

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

Drop = pb.Drop
DESCRIBE_UNIMPLEMENTED = (
    "Describe: the language path (inspection reports and questions) is not served: the model "
    "directory has no language/ part. Train it with `lineinspect train --data DATA --out MODEL_DIR "
    "--stages 1,2,3` and restart the server; Inspect and InspectStream work without it"
)

# ------------------------------------------------------------------------------ conversions

_DTYPES = {pb.RawImage.UINT8: "uint8", pb.RawImage.UINT16: "uint16"}


def image_from_proto(image: pb.Image, field: str = "image") -> ImageSource:
    """pb.Image -> EncodedImage | RawPixels; InvalidImage when nothing usable is set."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        if not image.encoded:
            raise InvalidImage(f"{field}.encoded: empty image (0 bytes)")
        return EncodedImage(image.encoded)
    if kind == "raw":
        raw = image.raw
        if raw.dtype in _DTYPES:
            dtype = _DTYPES[raw.dtype]
        elif raw.dtype == pb.RawImage.PIXEL_TYPE_UNSPECIFIED:
            dtype = "PIXEL_TYPE_UNSPECIFIED (dtype not set)"
        else:
            dtype = f"unknown PixelType value {raw.dtype}"
        return RawPixels(raw.pixels, raw.height, raw.width, raw.channels, dtype)
    raise InvalidImage(f"{field}: no image given; set {field}.encoded (file bytes) or {field}.raw (pixels)")


def verdict_to_proto(result: EngineResult) -> pb.Verdict:
    inspection = result.inspection
    return pb.Verdict(
        score=inspection.score,
        is_defect=inspection.is_defect,
        threshold=inspection.threshold,
        defect_class=inspection.defect_class,
        class_prob=inspection.class_prob,
        boxes=[
            pb.Box(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, score=b.score, label=b.label) for b in inspection.boxes
        ],
        heatmap_png=result.heatmap_png,
        image_width=result.width,
        image_height=result.height,
    )


def timings_to_proto(result: EngineResult | None, received: float) -> pb.StageTimings:
    if result is None:  # refused before the model: only the total is known
        return pb.StageTimings(total_ms=(time.perf_counter() - received) * 1000)
    t = result.timings_ms
    return pb.StageTimings(
        queue_ms=t["queue"], decode_ms=t["decode"], model_ms=t["model"], post_ms=t["post"],
        total_ms=t["total"], batch_size=result.batch_size,
    )


def classify(exc: BaseException, where: str) -> tuple[grpc.StatusCode, int, str]:
    """An engine error -> (gRPC status, Drop reason, message). Unexpected errors are logged."""
    if isinstance(exc, ImageTooLarge):
        return grpc.StatusCode.INVALID_ARGUMENT, Drop.TOO_LARGE, str(exc)
    if isinstance(exc, (InvalidImage, LineInspectError)):
        return grpc.StatusCode.INVALID_ARGUMENT, Drop.INVALID_IMAGE, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, Drop.OVERLOADED, str(exc)
    if isinstance(exc, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, Drop.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, Drop.SHUTTING_DOWN, str(exc)
    log.error("internal error", exc_info=exc, extra={"where": where})
    message = f"internal server error ({type(exc).__name__}); see the server log"
    return grpc.StatusCode.INTERNAL, Drop.INTERNAL, message


# ------------------------------------------------------------------------------ servicer


class InspectionServicer(pb_grpc.InspectionServiceServicer):
    def __init__(
        self, engine: InspectionEngine, metrics: ServiceMetrics, stream_window: int, frame_timeout_ms: float,
        describer: DescribeEngine | None = None,
    ) -> None:
        self.engine = engine
        self.describer = describer
        self.metrics = metrics
        self.stream_window = stream_window
        self.frame_timeout_s = frame_timeout_ms / 1000 if frame_timeout_ms > 0 else None

    async def Inspect(
        self, request: pb.InspectRequest, context: grpc.aio.ServicerContext
    ) -> pb.InspectResponse:
        received = time.perf_counter()
        try:
            source = image_from_proto(request.image)
            result = await self.engine.inspect(
                source,
                want_heatmap=request.options.want_heatmap,
                timeout_s=context.time_remaining(),
                received=received,
                name=f"request {request.request_id!r}" if request.request_id else "image",
            )
        except Exception as exc:
            code, _, message = classify(exc, "Inspect")
            self._record("Inspect", code, message)
            await context.abort(code, message)  # raises
            raise AssertionError("unreachable") from exc
        self.metrics.record("Inspect", "OK")
        return pb.InspectResponse(
            request_id=request.request_id, verdict=verdict_to_proto(result),
            timings=timings_to_proto(result, received),
        )

    async def InspectStream(
        self, request_iterator: AsyncIterable[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FrameResult]:
        self.metrics.inflight_streams.labels("InspectStream").inc()
        try:
            async for result in _pump(
                request_iterator, self._frame, self.stream_window, key=lambda frame: frame.camera_id
            ):
                yield result
        finally:
            self.metrics.inflight_streams.labels("InspectStream").dec()

    async def _frame(self, frame: pb.Frame, received: float) -> pb.FrameResult:
        reply = pb.FrameResult(camera_id=frame.camera_id, frame_id=frame.frame_id)
        if frame.HasField("capture_time"):
            reply.capture_time.CopyFrom(frame.capture_time)
        try:
            result = await self.engine.inspect(
                image_from_proto(frame.image, "frame.image"),
                want_heatmap=frame.options.want_heatmap,
                timeout_s=self.frame_timeout_s,
                received=received,
                name=f"camera {frame.camera_id!r} frame {frame.frame_id}",
                frame_key=(frame.camera_id, frame.frame_id) if self.describer is not None else None,
            )
        except Exception as exc:
            code, reason, message = classify(exc, "InspectStream")
            self._record("InspectStream", code, message)
            self.metrics.drops.labels(Drop.DropReason.Name(reason)).inc()
            reply.dropped.CopyFrom(Drop(reason=reason, detail=message))
            reply.timings.CopyFrom(timings_to_proto(None, received))
            return reply
        self.metrics.record("InspectStream", "OK")
        reply.verdict.CopyFrom(verdict_to_proto(result))
        reply.timings.CopyFrom(timings_to_proto(result, received))
        return reply

    async def Audit(
        self, request_iterator: AsyncIterable[pb.AuditItem], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AuditResult]:
        timeout = context.time_remaining()
        deadline = None if timeout is None else time.perf_counter() + timeout

        async def one(item: pb.AuditItem, received: float) -> pb.AuditResult:
            reply = pb.AuditResult(item_id=item.item_id)
            try:
                result = await self.engine.inspect(
                    image_from_proto(item.image, "item.image"),
                    want_heatmap=item.options.want_heatmap,
                    priority=Priority.BULK,
                    timeout_s=None if deadline is None else deadline - time.perf_counter(),
                    wait=True,  # batch jobs wait for queue space instead of being refused
                    received=received,
                    name=f"item {item.item_id!r}",
                )
            except Exception as exc:
                code, _, message = classify(exc, "Audit")
                self._record("Audit", code, message)
                reply.error.CopyFrom(pb.Error(code=code.name, message=message))
                reply.timings.CopyFrom(timings_to_proto(None, received))
                return reply
            self.metrics.record("Audit", "OK")
            reply.verdict.CopyFrom(verdict_to_proto(result))
            reply.timings.CopyFrom(timings_to_proto(result, received))
            return reply

        self.metrics.inflight_streams.labels("Audit").inc()
        try:
            async for result in _pump(request_iterator, one, self.stream_window, key=None):
                yield result
        finally:
            self.metrics.inflight_streams.labels("Audit").dec()

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TextChunk]:
        if self.describer is None:
            self._record("Describe", grpc.StatusCode.UNIMPLEMENTED, DESCRIBE_UNIMPLEMENTED)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, DESCRIBE_UNIMPLEMENTED)
        describer = self.describer
        try:
            describer.check(request.question, request.max_tokens, request.temperature)
            evidence = await self._evidence(request, context)
            chunks = describer.describe(evidence, request.question, request.max_tokens, request.temperature)
            try:
                async for chunk in chunks:
                    yield pb.TextChunk(text=chunk.text, done=chunk.done, tokens=chunk.tokens,
                                       finish_reason=chunk.finish_reason)
            finally:
                await chunks.aclose()  # a cancelled call frees its decoding slot at once
        except FrameNotCached as exc:
            self._record("Describe", grpc.StatusCode.NOT_FOUND, str(exc))
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except Exception as exc:
            code, _, message = classify(exc, "Describe")
            self._record("Describe", code, message)
            await context.abort(code, message)
        self.metrics.record("Describe", "OK")

    async def _evidence(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext):
        """The request's evidence tokens (N, D): from the frame cache, or by running the image
        through the fast path's batcher in the LOW lane (FAST work goes first)."""
        assert self.describer is not None
        source = request.WhichOneof("source")
        if source == "frame":
            key = (request.frame.camera_id, request.frame.frame_id)
            tokens = self.describer.frame_cache.get(key)
            if tokens is None:
                raise FrameNotCached(
                    f"frame: camera {key[0]!r} frame {key[1]} is not in the server's frame cache (it keeps "
                    f"the most recent stream frames, {len(self.describer.frame_cache)} now); send the image instead"
                )
            return tokens
        if source != "image":
            raise InvalidImage("source: no image given; set image (encoded or raw) or frame (camera_id, frame_id)")
        result = await self.engine.inspect(
            image_from_proto(request.image), priority=Priority.LOW, timeout_s=context.time_remaining(),
            name="describe image", want_tokens=True,
        )
        if result.tokens is None:
            raise RuntimeError("the fast path returned no evidence tokens for a Describe image")
        return result.tokens

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        info = self.engine.info()
        batcher = info["batcher"]
        self.metrics.record("GetModelInfo", "OK")
        return pb.ModelInfo(
            preset=str(info.get("preset", "")),
            version=str(info.get("version", "")),
            threshold=float(info.get("threshold", 0.0)),
            device=str(info.get("device", "")),
            class_names=[str(c) for c in info.get("class_names", [])],
            input_size=int(info.get("input_size", 0)),
            params=int(info.get("params", 0)),
            batcher=pb.BatcherSettings(
                min_batch=batcher["min_batch"], max_batch=batcher["max_batch"],
                max_delay_ms=batcher["max_delay_ms"], queue_capacity=batcher["queue_capacity"],
            ),
            server_version=info["server_version"],
            max_message_bytes=info["max_message_bytes"],
            score_source=str(info.get("score_source", "")),
            map_source=str(info.get("map_source", "")),
        )

    def _record(self, method: str, code: grpc.StatusCode, message: str) -> None:
        self.metrics.record(method, code.name)
        if code is not grpc.StatusCode.INTERNAL:  # INTERNAL was logged with its traceback
            log.info("request refused", extra={"method": method, "code": code.name, "detail": message})


async def _pump(
    requests: AsyncIterable[In],
    handle: Callable[[In, float], Awaitable[Out]],
    window: int,
    key: Callable[[In], str] | None,
) -> AsyncIterator[Out]:
    """Handle every request of a stream concurrently and yield one reply per request.

    With `key`, replies of one key (camera) come out in request order: each item's task waits
    for the previous task of its key before emitting. At most `window` requests are in flight
    or unsent; beyond that the reader stops reading, which is HTTP/2 flow control for the
    client. When the call ends (client gone, deadline), the generator is closed and every
    pending task is cancelled, which removes its item from the batcher queue.
    """
    replies: asyncio.Queue[Out | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    tails: dict[str, asyncio.Task] = {}
    tasks: set[asyncio.Task] = set()

    async def run(request: In, received: float, previous: asyncio.Task | None) -> None:
        reply = await handle(request, received)
        if previous is not None:
            await asyncio.wait([previous])
        replies.put_nowait(reply)

    def untail(name: str, task: asyncio.Task) -> None:
        tasks.discard(task)
        if tails.get(name) is task:
            del tails[name]

    async def read() -> None:
        try:
            async for request in requests:
                received = time.perf_counter()
                await slots.acquire()
                name = key(request) if key is not None else None
                previous = tails.get(name) if name is not None else None
                task = asyncio.create_task(run(request, received, previous))
                tasks.add(task)
                if name is not None:
                    tails[name] = task
                task.add_done_callback(lambda t, n=name: untail(n, t) if n is not None else tasks.discard(t))
            if tasks:
                await asyncio.wait(list(tasks))
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
            slots.release()
        reader.result()  # re-raise a failed read (e.g. a malformed client stream)
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
