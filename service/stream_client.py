"""Camera ingest client: frames from a source go over ONE bidirectional InspectStream call.

Threads: a capture thread reads the source at its own pace and puts each frame in a one-slot
:class:`Mailbox`; the gRPC request iterator takes the newest frame from it whenever fewer than
``max_in_flight`` frames await a reply, so when the server is slower than the camera the newest
frame wins and the replaced ones are counted as client drops. The main thread reads replies,
prints one JSON line per frame result and optionally writes an annotated MP4.

When the server goes away the call is retried on a fresh channel with capped, jittered
exponential backoff; frames in flight at that moment are counted as ``lost``. When a live
camera goes away the capture thread reopens it the same way. Counters survive reconnects:
``captured == sent + client_drops`` and ``sent == verdicts + server_drops + lost``.
"""

from __future__ import annotations

import ipaddress
import json
import random
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import cv2
import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from lineinspect.errors import LineInspectError
from lineinspect.images import encode_jpeg
from lineinspect.service.frames import FrameSource, SourceLost, SourceSpec, open_source
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc
from lineinspect.vision.result import Box, Inspection

T = TypeVar("T")

# Status codes that no retry will fix: the user has to change a flag or a file.
FATAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
})
LATENCY_WINDOW = 100_000  # percentiles are over the most recent verdicts


# ---------------------------------------------------------------------------------------------
# Building blocks: mailbox, backoff, connection


class MailboxClosed(Exception):
    """The mailbox is closed and empty: no frame will ever come."""


class Mailbox(Generic[T]):
    """A one-slot, thread-safe hand-over where the newest item wins.

    ``put`` replaces an item nobody has taken yet; the replaced item counts in ``dropped``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._full = False
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Offer an item; True when it replaced an older one. After close the item is dropped."""
        with self._cond:
            if self._closed:
                self.dropped += 1
                return False
            replaced = self._full
            if replaced:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify_all()
            return replaced

    def get(self, timeout: float | None = None) -> T | None:
        """Take the item, waiting up to `timeout` s (None on timeout); MailboxClosed when closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._full or self._closed, timeout):
                return None
            if not self._full:
                raise MailboxClosed
            item, self._item, self._full = self._item, None, False
            return item

    def restore(self, item: T) -> None:
        """Give back an item that was taken but not used; dropped if a newer one arrived meanwhile."""
        with self._cond:
            if self._full:
                self.dropped += 1
                return
            self._item, self._full = item, True
            self._cond.notify_all()

    def discard(self) -> None:
        """Drop the waiting item, if any (counted)."""
        with self._cond:
            if self._full:
                self.dropped += 1
                self._item, self._full = None, False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def exhausted(self) -> bool:
        """Closed and empty."""
        with self._cond:
            return self._closed and not self._full


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: delay n is ``min(maximum, initial * factor**n)``
    scaled by a random factor in [1 - jitter, 1], so clients that lost the same server do not
    all come back in the same millisecond."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.3
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1 or not 0 <= self.jitter < 1:
            raise LineInspectError(
                f"backoff: need 0 < initial ({self.initial}) <= maximum ({self.maximum}), "
                f"factor ({self.factor}) >= 1 and 0 <= jitter ({self.jitter}) < 1"
            )

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        return base * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0


def parse_server(server: str) -> str:
    """Check a HOST:PORT value, or a comma-separated list of IPv4 HOST:PORT replicas, and return
    the gRPC target: the list becomes gRPC's own ``ipv4:`` target, balanced by `open_channel`."""
    parts = server.split(",")
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LineInspectError(f"--server {server!r}: expected HOST:PORT, for example 127.0.0.1:50051, "
                                   "or replicas as 10.0.0.1:50051,10.0.0.2:50051")
        if len(parts) > 1 and not _is_ipv4(host):
            raise LineInspectError(f"--server {server!r}: a list of replicas takes IPv4 addresses ({host!r} is "
                                   "not one); for a DNS name with several addresses pass dns:///NAME:PORT")
    return f"ipv4:{server}" if len(parts) > 1 else server


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


def _read_pem(path: Path, flag: str, marker: bytes, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LineInspectError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from exc
    if marker not in data:
        raise LineInspectError(f"{flag} {path}: not a PEM {what}")
    return data


def open_channel(server: str, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None) -> grpc.Channel:
    """A channel to HOST:PORT; TLS verified against `tls_ca` when given, plus a client
    certificate (`tls_cert`, `tls_key`) for a server that demands mutual TLS. Several replicas
    (a comma-separated list, or a dns:/// name with several addresses) are balanced by gRPC's
    round_robin policy: each call (a camera's stream, a unary request) goes to the next replica."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.lb_policy_name", "round_robin")]
    if (tls_cert is None) != (tls_key is None):
        raise LineInspectError("a client certificate needs both --tls-cert and --tls-key")
    if tls_ca is None:
        if tls_cert is not None:
            raise LineInspectError("--tls-cert/--tls-key need --tls-ca (the CA that signed the server)")
        return grpc.insecure_channel(parse_server(server), options=options)
    root = _read_pem(tls_ca, "--tls-ca", b"CERTIFICATE", "CA certificate; pass the server's CA")
    cert = key = None
    if tls_cert is not None and tls_key is not None:
        cert = _read_pem(tls_cert, "--tls-cert", b"CERTIFICATE", "certificate")
        key = _read_pem(tls_key, "--tls-key", b"PRIVATE KEY", "private key")
    credentials = grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(parse_server(server), credentials, options=options)


def auth_metadata(token_file: Path | None) -> tuple[tuple[str, str], ...]:
    """``authorization: Bearer <token>`` from the first token line of a file (blank lines and
    # comments skipped, the same format the server reads)."""
    if token_file is None:
        return ()
    try:
        lines = Path(token_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LineInspectError(f"--token-file {token_file}: cannot read ({exc})") from exc
    tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not tokens:
        raise LineInspectError(f"--token-file {token_file}: no token in the file; put the server's token in it")
    return (("authorization", f"Bearer {tokens[0]}"),)


def wait_ready(channel: grpc.Channel, timeout: float) -> bool:
    """True when the channel connects within `timeout` seconds."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False


def rpc_failure(server: str, exc: grpc.RpcError) -> LineInspectError:
    """A fatal gRPC status as a user-facing error."""
    code = exc.code()
    hint = {
        grpc.StatusCode.UNAUTHENTICATED: "pass the server's token with --token-file",
        grpc.StatusCode.PERMISSION_DENIED: "the token is not allowed to call this method",
        grpc.StatusCode.UNIMPLEMENTED: "the server does not serve this method; check the server version",
    }.get(code, "see the server log")
    return LineInspectError(f"server {server}: {code.name}: {exc.details()}; {hint}")


# ---------------------------------------------------------------------------------------------
# Message conversion


def verdict_to_inspection(verdict: pb.Verdict) -> Inspection:
    """A Verdict message as the vision result type (heatmap decoded to float [0, 1] when present)."""
    heatmap = None
    if verdict.heatmap_png:
        grey = cv2.imdecode(np.frombuffer(verdict.heatmap_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            heatmap = grey.astype(np.float32) / 255.0
    boxes = [Box(b.x0, b.y0, b.x1, b.y1, float(b.score), b.label) for b in verdict.boxes]
    return Inspection(
        score=float(verdict.score),
        is_defect=verdict.is_defect,
        threshold=float(verdict.threshold),
        defect_class=verdict.defect_class,
        class_prob=float(verdict.class_prob),
        boxes=boxes,
        heatmap=heatmap,
    )


def timings_to_dict(timings: pb.StageTimings) -> dict[str, float]:
    return {
        "queue_ms": round(timings.queue_ms, 3),
        "decode_ms": round(timings.decode_ms, 3),
        "model_ms": round(timings.model_ms, 3),
        "post_ms": round(timings.post_ms, 3),
        "total_ms": round(timings.total_ms, 3),
        "batch_size": timings.batch_size,
    }


def drop_reason(drop: pb.Drop) -> str:
    """The reason's name; a value this client does not know yet (newer server) stays readable."""
    try:
        return pb.Drop.DropReason.Name(drop.reason)
    except ValueError:
        return f"DROP_REASON_{drop.reason}"


def verdict_text(inspection: Inspection) -> str:
    """One short line for an overlay header."""
    label = "DEFECT" if inspection.is_defect else "GOOD"
    cls = f" {inspection.defect_class} {inspection.class_prob:.2f}" if inspection.defect_class else ""
    return f"{label} {inspection.score:.3f}{cls}"


# ---------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True)
class StreamConfig:
    source: str
    server: str
    camera_id: str
    fps: float | None = None  # capture rate cap; None: a video file's own rate, others unpaced
    max_frames: int | None = None  # stop after this many frames read from the source
    jpeg_quality: int = 90
    annotate: Path | None = None  # MP4 of the frames with overlays
    loop: bool = False  # replay a video file or image folder forever
    heatmaps: bool = False  # ask for heatmaps (drawn into --annotate)
    max_in_flight: int = 2  # frames sent and not yet answered; more waiting only adds latency
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate for mutual TLS
    tls_key: Path | None = None
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    connect_timeout_s: float = 3.0
    reply_timeout_s: float = 15.0  # frames in flight and no reply for this long: reconnect
    give_up_after_s: float | None = None  # None: retry forever

    def __post_init__(self) -> None:
        if not self.camera_id:
            raise LineInspectError("--camera-id must not be empty")
        if not 1 <= self.jpeg_quality <= 100:
            raise LineInspectError(f"--jpeg-quality {self.jpeg_quality}: use 1..100")
        if self.fps is not None and self.fps <= 0:
            raise LineInspectError(f"--fps {self.fps}: must be > 0")
        if self.max_frames is not None and self.max_frames < 1:
            raise LineInspectError(f"--max-frames {self.max_frames}: must be >= 1")
        if self.max_in_flight < 1:
            raise LineInspectError(f"--max-in-flight {self.max_in_flight}: must be >= 1")
        if self.annotate is not None and Path(self.annotate).suffix.lower() != ".mp4":
            raise LineInspectError(f"--annotate {self.annotate}: the file name must end in .mp4")
        parse_server(self.server)


@dataclass
class CapturedFrame:
    frame_id: int
    image: np.ndarray  # (H, W, 3) RGB uint8
    mono: float  # time.monotonic() at capture, for end-to-end latency
    wall_ns: int  # time.time_ns() at capture, sent as capture_time


@dataclass
class StreamStats:
    captured: int = 0
    sent: int = 0
    verdicts: int = 0
    server_drops: int = 0
    lost: int = 0  # sent, then the connection died before the reply
    server_reconnects: int = 0
    camera_reconnects: int = 0
    drop_reasons: Counter = field(default_factory=Counter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class AnnotatedWriter:
    """MP4 (mp4v) of frames with their overlays; opened on the first frame, fixed size after."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise LineInspectError(f"--annotate {path}: folder {self.path.parent} does not exist")
        self.fps = fps
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None

    def write(self, image: np.ndarray, inspection: Inspection | None, text: str) -> None:
        from lineinspect.service.overlay import render_overlay

        if inspection is None:
            picture = render_overlay(image, None, [], text, defect=None)
        else:
            picture = render_overlay(image, inspection.heatmap, inspection.boxes, text,
                                     defect=inspection.is_defect)
        if self._writer is None:
            self._size = (picture.shape[1], picture.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise LineInspectError(f"--annotate {self.path}: OpenCV cannot write an mp4v video there")
        if (picture.shape[1], picture.shape[0]) != self._size:
            picture = cv2.resize(picture, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def print_event(event: dict) -> None:
    print(json.dumps(event, separators=(",", ":")), flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class StreamClient:
    """Runs one camera feed against the server until the source ends or :meth:`request_stop`."""

    def __init__(
        self,
        config: StreamConfig,
        emit: Callable[[dict], None] = print_event,
        log: Callable[[str], None] = warn,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.emit = emit
        self.log = log
        self.stats = StreamStats()
        self.mailbox: Mailbox[CapturedFrame] = Mailbox()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[int, CapturedFrame] = {}
        self._capture_error: BaseException | None = None
        self._metadata = auth_metadata(config.token_file)
        self._writer: AnnotatedWriter | None = None
        self._started = 0.0
        self._last_ok = 0.0

    # -- public -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop capturing; frames already sent are still answered, then run() returns."""
        self._stop.set()
        self.mailbox.close()

    def run(self) -> dict:
        """Stream until the source ends (or a stop request); return the summary (also emitted)."""
        spec, source = open_source(self.config.source, self.config.loop)
        fps = self.config.fps or (source.fps if not spec.live else None)
        if self.config.annotate is not None:
            self._writer = AnnotatedWriter(self.config.annotate, fps or source.fps or 10.0)
        self._started = time.monotonic()
        capture = threading.Thread(target=self._capture, args=(spec, source, fps), daemon=True)
        capture.start()
        try:
            self._send_loop()
        finally:
            self.request_stop()
            capture.join(timeout=5.0)
            self.mailbox.discard()  # a frame captured after the last send never goes out
            if self._writer is not None:
                self._writer.close()
        if self._capture_error is not None:
            raise self._capture_error
        summary = self.summary()
        self.emit(summary)
        return summary

    def summary(self) -> dict:
        s = self.stats
        lat = np.asarray(s.latencies_ms, dtype=np.float64)

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 3) if lat.size else None

        return {
            "event": "summary",
            "camera_id": self.config.camera_id,
            "captured": s.captured,
            "sent": s.sent,
            "verdicts": s.verdicts,
            "server_drops": s.server_drops,
            "client_drops": self.mailbox.dropped,
            "lost_in_flight": s.lost,
            "drop_reasons": dict(s.drop_reasons),
            "server_reconnects": s.server_reconnects,
            "camera_reconnects": s.camera_reconnects,
            "latency_ms": {"p50": pct(50), "p99": pct(99), "max": pct(100)},
            "duration_s": round(time.monotonic() - self._started, 3),
        }

    # -- capture thread -----------------------------------------------------------------------

    def _capture(self, spec: SourceSpec, source: FrameSource, fps: float | None) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s, rng=self._rng)
        interval = 1.0 / fps if fps else 0.0
        due = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.config.max_frames is not None and self.stats.captured >= self.config.max_frames:
                    break
                if interval:
                    now = time.monotonic()
                    if due > now and self._stop.wait(due - now):
                        break
                    due = max(due + interval, now)  # after a stall, do not burst to catch up
                try:
                    image = source.read()
                except SourceLost as exc:
                    source.close()
                    source = self._reopen(spec, backoff, str(exc))
                    if source is None:
                        break
                    continue
                if image is None:
                    break
                backoff.reset()
                self.stats.captured += 1
                frame = CapturedFrame(self.stats.captured - 1, image, time.monotonic(), time.time_ns())
                self.mailbox.put(frame)
        except BaseException as exc:  # surfaced by run() in the main thread
            self._capture_error = exc
        finally:
            source.close()
            self.mailbox.close()

    def _reopen(self, spec: SourceSpec, backoff: Backoff, why: str) -> FrameSource | None:
        """Reopen a lost live source with backoff; None when stopped first."""
        while not self._stop.is_set():
            delay = backoff.next_delay()
            self.log(f"{why}; reopening in {delay:.1f} s")
            if self._stop.wait(delay):
                return None
            try:
                source = spec.open()
            except SourceLost as exc:
                why = str(exc)
                continue
            self.stats.camera_reconnects += 1
            return source
        return None

    # -- sending and receiving ----------------------------------------------------------------

    def _send_loop(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, rng=self._rng)
        self._last_ok = time.monotonic()
        connected_before = False
        while True:
            channel = open_channel(cfg.server, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            try:
                if wait_ready(channel, cfg.connect_timeout_s):
                    self._last_ok = time.monotonic()
                    self.stats.server_reconnects += connected_before
                    connected_before = True
                    if self._session(pb_grpc.InspectionServiceStub(channel), backoff):
                        return
                    why = "server ended the stream early"
                else:
                    why = f"server {cfg.server} unreachable"
            except grpc.RpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise rpc_failure(cfg.server, exc) from None
                why = f"stream broke ({exc.code().name}: {exc.details()})"
            finally:
                channel.close()
                self._abandon_in_flight()
            if self.mailbox.exhausted or self._stop.is_set():
                return  # nothing left to send
            if cfg.give_up_after_s is not None and time.monotonic() - self._last_ok > cfg.give_up_after_s:
                raise LineInspectError(
                    f"server {cfg.server}: no connection for {cfg.give_up_after_s:.0f} s ({why}); "
                    "check that the server runs and --server points at it"
                )
            delay = backoff.next_delay()
            self.log(f"{why}; reconnecting in {delay:.2f} s")
            if self._stop.wait(delay):
                return

    def _abandon_in_flight(self) -> None:
        with self._lock:
            self.stats.lost += len(self._in_flight)
            self._in_flight.clear()

    def _session(self, stub: pb_grpc.InspectionServiceStub, backoff: Backoff) -> bool:
        """One InspectStream call; True when every frame was sent and answered."""
        cfg = self.config
        dead = threading.Event()
        exhausted = threading.Event()
        window = threading.Semaphore(cfg.max_in_flight)
        options = pb.InspectOptions(want_heatmap=cfg.heatmaps)

        # `busy` is held while a frame is out of the mailbox but not yet in flight, so that when
        # the call ends the frame is either in flight (and counted lost) or back in the mailbox.
        busy = threading.Lock()

        def requests() -> Iterator[pb.Frame]:
            while not dead.is_set():
                if not window.acquire(timeout=0.1):
                    continue
                with busy:
                    if dead.is_set():
                        return
                    try:
                        frame = self.mailbox.get(timeout=0.1)
                    except MailboxClosed:
                        exhausted.set()
                        return
                    if frame is None:
                        window.release()
                        continue
                    stamp = Timestamp()
                    stamp.FromNanoseconds(frame.wall_ns)
                    message = pb.Frame(
                        camera_id=cfg.camera_id,
                        frame_id=frame.frame_id,
                        capture_time=stamp,
                        image=pb.Image(encoded=encode_jpeg(frame.image, cfg.jpeg_quality)),
                        options=options,
                    )
                    with self._lock:
                        if dead.is_set():  # the call ended while we encoded: the frame was never sent
                            self.mailbox.restore(frame)
                            return
                        self._in_flight[frame.frame_id] = frame
                        self.stats.sent += 1
                yield message

        call = stub.InspectStream(requests(), metadata=self._metadata)
        last_reply = [time.monotonic()]
        watchdog = threading.Thread(target=self._watch, args=(call, dead, last_reply), daemon=True)
        watchdog.start()
        try:
            for reply in call:
                last_reply[0] = time.monotonic()
                if self._handle(reply):
                    self._last_ok = last_reply[0]
                    window.release()
                    backoff.reset()
        finally:
            with self._lock:
                dead.set()
            if busy.acquire(timeout=10.0):  # let the request thread put back a frame it holds
                busy.release()
        with self._lock:
            return exhausted.is_set() and not self._in_flight

    def _watch(self, call: grpc.Future, dead: threading.Event, last_reply: list[float]) -> None:
        """Cancel a call that has frames in flight but no reply for reply_timeout_s (a hung peer)."""
        while not dead.wait(0.5):
            with self._lock:
                waiting = bool(self._in_flight)
            if waiting and time.monotonic() - last_reply[0] > self.config.reply_timeout_s:
                self.log(f"no reply for {self.config.reply_timeout_s:.0f} s; dropping the connection")
                call.cancel()
                return

    def _handle(self, reply: pb.FrameResult) -> bool:
        """Account for one FrameResult and emit its JSON line; False for an unknown frame id."""
        now = time.monotonic()
        with self._lock:
            frame = self._in_flight.pop(reply.frame_id, None)
        if frame is None:
            self.log(f"reply for frame {reply.frame_id} that is not in flight; ignored")
            return False
        latency = round((now - frame.mono) * 1000.0, 3)
        event: dict = {"camera_id": reply.camera_id or self.config.camera_id, "frame_id": reply.frame_id}
        if reply.WhichOneof("outcome") == "verdict":
            self.stats.verdicts += 1
            self.stats.latencies_ms.append(latency)
            inspection = verdict_to_inspection(reply.verdict)
            event = {"event": "verdict", **event, **inspection.to_dict(), "latency_ms": latency,
                     "server_timings_ms": timings_to_dict(reply.timings)}
            text = f"#{frame.frame_id} {verdict_text(inspection)}"
        else:
            reason = drop_reason(reply.dropped) if reply.HasField("dropped") else "NO_OUTCOME"
            self.stats.server_drops += 1
            self.stats.drop_reasons[reason] += 1
            inspection = None
            event = {"event": "dropped", **event, "reason": reason, "detail": reply.dropped.detail,
                     "latency_ms": latency}
            text = f"#{frame.frame_id} dropped: {reason}"
        self.emit(event)
        if self._writer is not None:
            self._writer.write(frame.image, inspection, text)
        return True
