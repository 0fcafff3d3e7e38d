"""Batch audit of stored images: every item gets exactly one row in ``results.jsonl``.

Rows are appended and fsync'ed one by one, so a crash loses at most the row being written; a
rerun with the same --out resumes: items already in the file are skipped, and a torn last line
left by the crash is cut off (that item is simply done again). Unreadable images become error
rows; they never stop the audit. The items go either to a server (the streaming Audit RPC,
``concurrency`` items in flight) or to a local :class:`Inspector` in batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from lineinspect.errors import LineInspectError
from lineinspect.images import encode_png, read_image
from lineinspect.service.frames import IMAGE_SUFFIXES, list_images
from lineinspect.service.stream_client import (
    FATAL_CODES,
    Backoff,
    auth_metadata,
    open_channel,
    rpc_failure,
    timings_to_dict,
    verdict_to_inspection,
    wait_ready,
)
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc
from lineinspect.vision.result import Inspection

RESULTS_FILE = "results.jsonl"
STATE_FILE = "audit.json"
HEATMAP_DIR = "heatmaps"
RETRY_CODES = frozenset({"UNAVAILABLE"})  # per-item errors that say nothing about the image
MESSAGE_SLACK = 64 * 1024  # room for the item id and framing inside the server's max message size

Record = Callable[[dict], None]


@dataclass(frozen=True)
class AuditItem:
    item_id: str  # the path relative to the audited folder, or as written in the manifest
    path: Path


@dataclass(frozen=True)
class AuditConfig:
    source: Path  # a folder of images (recursive) or a manifest with one path per line
    out: Path  # report folder: results.jsonl, summary.json, results.csv, report.html
    server: str | None = None  # HOST:PORT of a lineinspect server ...
    model_dir: Path | None = None  # ... or a model directory run locally
    concurrency: int = 4  # items in flight (server) / decoding threads (local)
    heatmaps: bool = False  # keep heatmaps (heatmaps/*.png) and draw them in the report
    device: str = "cpu"
    batch_size: int = 8  # local model batch size
    thumbnails: int = 1000  # report rows with a picture (the highest scores); the rest are text
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate for mutual TLS
    tls_key: Path | None = None
    progress: bool = True  # tqdm bar on stderr
    max_attempts: int = 3  # an item the server never answers is retried this often, then an error row
    connect_timeout_s: float = 5.0
    give_up_after_s: float = 120.0  # no server connection for this long -> stop (rerun resumes)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise LineInspectError(f"--concurrency {self.concurrency}: must be >= 1")
        if self.batch_size < 1:
            raise LineInspectError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.thumbnails < 0:
            raise LineInspectError(f"--thumbnails {self.thumbnails}: must be >= 0")
        if self.give_up_after_s < 0:
            raise LineInspectError(f"--give-up-after {self.give_up_after_s}: must be >= 0")
        if self.max_attempts < 1:
            raise LineInspectError(f"max_attempts {self.max_attempts}: must be >= 1")


# ---------------------------------------------------------------------------------------------
# Items


def collect_items(source: Path) -> list[AuditItem]:
    """Items of a folder (recursive, sorted) or a manifest (relative paths are relative to it)."""
    source = Path(source)
    if source.is_dir():
        items = [AuditItem(p.relative_to(source).as_posix(), p) for p in list_images(source, recursive=True)]
        if not items:
            raise LineInspectError(
                f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder or below it"
            )
        return items
    if not source.is_file():
        raise LineInspectError(f"{source}: no such folder or manifest; pass a folder of images or a text "
                               "file listing one image path per line")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LineInspectError(f"{source}: cannot read the manifest ({exc}); it must be UTF-8 text") from exc
    if source.suffix.lower() in IMAGE_SUFFIXES:
        raise LineInspectError(f"{source}: this is an image, not a manifest; pass its folder instead")
    items, seen = [], set()
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#") or entry in seen:
            continue
        seen.add(entry)
        path = Path(entry)
        items.append(AuditItem(entry, path if path.is_absolute() else source.parent / path))
    if not items:
        raise LineInspectError(f"{source}: the manifest lists no images (one path per line, # for comments)")
    return items


# ---------------------------------------------------------------------------------------------
# results.jsonl


class ResultsStore:
    """Append-only JSON lines, each write flushed to disk before the next item counts as done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.dropped_torn = False

    def load(self) -> dict[str, dict]:
        """item_id -> row of what is on disk. A torn or garbled tail (a crash mid-write) is cut off;
        a bad line followed by good ones means someone edited the file, which is an error."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        rows: dict[str, dict] = {}
        offset, good_end, bad_line = 0, 0, None
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            row = _parse_row(line)
            if row is None:
                if line.strip(b"\x00 \t\r\n") and bad_line is None:
                    bad_line = number
            elif bad_line is not None:
                raise LineInspectError(
                    f"{self.path}: line {bad_line} is not a result row but later lines are; fix or delete "
                    "that line (or the whole file to start the audit over)"
                )
            else:
                rows.setdefault(row["item_id"], row)
                good_end = offset + len(line)
            offset += len(line)
        if good_end < len(data):
            self.dropped_torn = bad_line is not None
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
        return rows

    def append(self, row: dict) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = (json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _parse_row(line: bytes) -> dict | None:
    if not line.endswith(b"\n"):
        return None  # torn: the newline is the last byte of every complete write
    try:
        row = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("item_id"), str) else None


# ---------------------------------------------------------------------------------------------
# Rows


def heatmap_name(item_id: str) -> str:
    return f"{HEATMAP_DIR}/{hashlib.sha1(item_id.encode()).hexdigest()[:20]}.png"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ok_row(out: Path, item: AuditItem, inspection: Inspection, timings: dict, heatmap_png: bytes | None,
           image_size: tuple[int, int] | None) -> dict:
    """A verdict row; the heatmap (8-bit grey PNG) is saved under heatmaps/ first."""
    heatmap = None
    if heatmap_png:
        heatmap = heatmap_name(item.item_id)
        _write_atomic(out / heatmap, heatmap_png)
    return {
        "item_id": item.item_id,
        "path": str(item.path),
        "status": "ok",
        **inspection.to_dict(),
        "image_size": list(image_size) if image_size else None,
        "heatmap": heatmap,
        "timings_ms": timings,
        "error": None,
    }


def error_row(item: AuditItem, message: str, code: str = "INVALID_ARGUMENT") -> dict:
    return {"item_id": item.item_id, "path": str(item.path), "status": "error", "verdict": "error",
            "score": None, "error_code": code, "error": message}


def heatmap_png_of(inspection: Inspection) -> bytes | None:
    if inspection.heatmap is None:
        return None
    return encode_png((np.clip(inspection.heatmap, 0.0, 1.0) * 255.0).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Backends


class ServerBackend:
    """Items over one streaming Audit call at a time, ``concurrency`` in flight; a broken stream
    is reopened with backoff and its unanswered items are sent again."""

    def __init__(self, config: AuditConfig, log: Callable[[str], None]) -> None:
        assert config.server is not None
        self.config = config
        self.log = log
        self.metadata = auth_metadata(config.token_file)
        self.max_bytes = 0
        self._info: dict | None = None

    def model_info(self) -> dict:
        if self._info is None:
            cfg = self.config
            backoff = Backoff(0.2, 5.0)
            started = time.monotonic()
            while True:
                channel = open_channel(cfg.server, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
                try:
                    if wait_ready(channel, cfg.connect_timeout_s):
                        stub = pb_grpc.InspectionServiceStub(channel)
                        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata,
                                                 timeout=cfg.connect_timeout_s)
                        break
                    why = "unreachable"
                except grpc.RpcError as exc:
                    if exc.code() in FATAL_CODES:
                        raise rpc_failure(cfg.server, exc) from None
                    why = f"{exc.code().name}: {exc.details()}"
                finally:
                    channel.close()
                if time.monotonic() - started > cfg.give_up_after_s:
                    raise LineInspectError(f"server {cfg.server}: {why}; check that it runs and --server "
                                           "points at it")
                delay = backoff.next_delay()
                self.log(f"server {cfg.server} {why}; retrying in {delay:.1f} s")
                time.sleep(delay)
            self.max_bytes = int(info.max_message_bytes)
            self._info = MessageToDict(info, preserving_proto_field_name=True)
            self._info.setdefault("threshold", 0.0)
        return self._info

    def run(self, items: Sequence[AuditItem], record: Record) -> None:
        cfg = self.config
        self.model_info()
        queue = deque(items)
        attempts: Counter = Counter()
        backoff = Backoff(0.2, 10.0)
        last_ok = time.monotonic()
        while queue:
            channel = open_channel(cfg.server, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            state = _Session(cfg.concurrency)
            try:
                if not wait_ready(channel, cfg.connect_timeout_s):
                    why = "unreachable"
                else:
                    last_ok = time.monotonic()
                    stub = pb_grpc.InspectionServiceStub(channel)
                    call = stub.Audit(self._requests(queue, state, attempts, record), metadata=self.metadata)
                    for result in call:
                        item = state.answered(result.item_id)
                        if item is None:
                            self.log(f"server answered unknown item {result.item_id!r}; ignored")
                            continue
                        if result.WhichOneof("outcome") == "error" and result.error.code in RETRY_CODES:
                            # e.g. the server is draining for a restart: not a verdict on the image
                            state.retry.append(item)
                            state.dead.set()  # send nothing more on this call
                            continue
                        record(self._row(item, result))
                        last_ok = time.monotonic()
                        backoff.reset()
                    why = "server ended the stream early"
            except grpc.RpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise rpc_failure(cfg.server, exc) from None
                why = f"{exc.code().name}: {exc.details()}"
            finally:
                unanswered = state.close() + state.retry
                channel.close()
            if state.failure is not None:
                raise state.failure
            for item in reversed(unanswered):  # back to the front of the queue, in order
                if attempts[item.item_id] >= cfg.max_attempts:
                    record(error_row(item, f"no answer from the server after {cfg.max_attempts} attempts "
                                           f"(last: {why})", "UNAVAILABLE"))
                else:
                    queue.appendleft(item)
            if not queue:
                break
            if time.monotonic() - last_ok > cfg.give_up_after_s:
                raise LineInspectError(f"server {cfg.server}: {why} for {cfg.give_up_after_s:.0f} s; "
                                       "rerun the same command to resume once it is back")
            delay = backoff.next_delay()
            self.log(f"audit stream broke ({why}); {len(queue)} items left, reconnecting in {delay:.1f} s")
            time.sleep(delay)

    def _requests(self, queue: deque, state: _Session, attempts: Counter,
                  record: Record) -> Iterator[pb.AuditItem]:
        """Read and send items while fewer than `concurrency` await an answer."""
        options = pb.InspectOptions(want_heatmap=self.config.heatmaps)
        limit = self.max_bytes - MESSAGE_SLACK if self.max_bytes else None
        try:
            while True:
                if not state.window.acquire(timeout=0.1):
                    if state.dead.is_set():
                        return
                    continue
                with state.busy:  # an item taken from the queue is sent, recorded or put back
                    with state.lock:
                        if state.dead.is_set() or not queue:
                            return
                        item = queue.popleft()
                    problem = None
                    try:
                        data = item.path.read_bytes()
                    except OSError as exc:
                        problem = error_row(item, f"{item.path}: cannot read ({exc.strerror or exc})", "NOT_FOUND")
                    else:
                        if limit is not None and len(data) > limit:
                            problem = error_row(item, f"{item.path}: {len(data)} bytes, above the server's message "
                                                      f"limit of {self.max_bytes} bytes; shrink or re-encode it",
                                                "RESOURCE_EXHAUSTED")
                    if problem is not None:
                        record(problem)
                        state.window.release()
                        continue
                    if not state.send(item, attempts):
                        with state.lock:
                            queue.appendleft(item)
                        return
                yield pb.AuditItem(item_id=item.item_id, image=pb.Image(encoded=data), options=options)
        except Exception as exc:  # e.g. a failing result hook: stop sending, surface it later
            # (GeneratorExit, when gRPC drops the iterator of a dead call, is not one of these)
            state.failure = exc
            state.dead.set()

    def _row(self, item: AuditItem, result: pb.AuditResult) -> dict:
        if result.WhichOneof("outcome") == "verdict":
            v = result.verdict
            size = (v.image_width, v.image_height) if v.image_width else None
            return ok_row(self.config.out, item, verdict_to_inspection(v), timings_to_dict(result.timings),
                          v.heatmap_png or None, size)
        if result.HasField("error"):
            return error_row(item, result.error.message, result.error.code or "UNKNOWN")
        return error_row(item, "the server sent a result without verdict or error", "UNKNOWN")


class _Session:
    """Bookkeeping of one Audit call, shared by the request thread and the reply loop."""

    def __init__(self, concurrency: int) -> None:
        self.lock = threading.Lock()
        self.busy = threading.Lock()  # held by the request thread while it holds an item
        self.window = threading.Semaphore(concurrency)
        self.dead = threading.Event()
        self.in_flight: dict[str, AuditItem] = {}
        self.failure: Exception | None = None
        self.retry: list[AuditItem] = []  # answered with a transient error: send again

    def send(self, item: AuditItem, attempts: Counter) -> bool:
        with self.lock:
            if self.dead.is_set():
                return False
            self.in_flight[item.item_id] = item
            attempts[item.item_id] += 1
            return True

    def answered(self, item_id: str) -> AuditItem | None:
        with self.lock:
            item = self.in_flight.pop(item_id, None)
        if item is not None:
            self.window.release()
        return item

    def close(self) -> list[AuditItem]:
        """End the session; the items sent and not answered."""
        self.dead.set()
        if self.busy.acquire(timeout=30.0):  # the request thread puts back what it holds
            self.busy.release()
        with self.lock:
            left = list(self.in_flight.values())
            self.in_flight.clear()
            return left


class LocalBackend:
    """A local Inspector over batches; the next batch is decoded while the current one runs."""

    def __init__(self, config: AuditConfig, inspector) -> None:
        self.config = config
        self.inspector = inspector

    def model_info(self) -> dict:
        return dict(self.inspector.info())

    def run(self, items: Sequence[AuditItem], record: Record) -> None:
        size = self.config.batch_size
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            loading = [pool.submit(_load, it) for it in batches[0]] if batches else []
            for k in range(len(batches)):
                current: list[Future] = loading
                loading = [pool.submit(_load, it) for it in batches[k + 1]] if k + 1 < len(batches) else []
                ready: list[tuple[AuditItem, np.ndarray]] = []
                for item, (image, problem) in zip(batches[k], (f.result() for f in current), strict=True):
                    if image is None:
                        record(error_row(item, problem))
                    else:
                        ready.append((item, image))
                for row in self._inspect(ready):
                    record(row)

    def _inspect(self, ready: list[tuple[AuditItem, np.ndarray]]) -> list[dict]:
        if not ready:
            return []
        images = [image for _, image in ready]
        try:
            results = self.inspector.inspect_batch(images, heatmaps=self.config.heatmaps)
        except Exception:  # find the image that breaks the batch; the others still get verdicts
            if len(ready) == 1:
                item, _ = ready[0]
                exc = sys.exc_info()[1]
                return [error_row(item, f"{item.path}: the model failed on this image ({exc!r})", "INTERNAL")]
            return [row for pair in ready for row in self._inspect([pair])]
        return [
            ok_row(self.config.out, item, inspection, _rounded(inspection.timings_ms),
                   heatmap_png_of(inspection), (image.shape[1], image.shape[0]))
            for (item, image), inspection in zip(ready, results, strict=True)
        ]


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}


def _load(item: AuditItem) -> tuple[np.ndarray | None, str]:
    try:
        return read_image(item.path), ""
    except LineInspectError as exc:
        return None, str(exc)


# ---------------------------------------------------------------------------------------------
# The audit


def _check_state(out: Path, source: Path, info: dict) -> dict:
    """Refuse to mix the results of another source or model into an existing report folder."""
    path = out / STATE_FILE
    key = {"preset": info.get("preset"), "version": info.get("version"),
           "threshold": round(float(info.get("threshold") or 0.0), 5),
           "class_names": list(info.get("class_names") or [])}
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = {}
        if state.get("source") not in (None, str(source)):
            raise LineInspectError(f"{out}: holds an audit of {state['source']}, not {source}; "
                                   "pass another --out folder")
        if state.get("model_key") not in (None, key):
            raise LineInspectError(f"{out}: its results come from another model ({state['model_key']}); "
                                   "pass another --out folder so verdicts of two models do not mix")
    else:
        state = {"source": str(source), "model_key": key, "runs": []}
    state.update(source=str(source), model_key=key)
    return state


def run_audit(config: AuditConfig, inspector=None, on_result: Record | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Audit every item not yet in results.jsonl, then write summary.json, results.csv and
    report.html; return the summary. `inspector` replaces loading `config.model_dir`;
    `on_result` sees each new row after it is on disk."""
    from lineinspect.service.audit_report import write_reports

    log = log or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    if (config.server is None) == (config.model_dir is None and inspector is None):
        raise LineInspectError("audit: pass exactly one of --server HOST:PORT and --model MODEL_DIR")
    started = time.monotonic()
    source = Path(config.source).resolve()
    items = collect_items(Path(config.source))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / HEATMAP_DIR).mkdir(exist_ok=True)

    if config.server is not None:
        backend: ServerBackend | LocalBackend = ServerBackend(config, log)
    else:
        if inspector is None:
            from lineinspect.vision.model_io import load_inspector

            inspector = load_inspector(config.model_dir, config.device)
        backend = LocalBackend(config, inspector)
    info = backend.model_info()
    state = _check_state(out, source, info)

    store = ResultsStore(out / RESULTS_FILE)
    done = store.load()
    if store.dropped_torn:
        log(f"{store.path}: cut off a torn last line from an interrupted run; that item is done again")
    pending = [item for item in items if item.item_id not in done]
    _write_atomic(out / STATE_FILE, json.dumps(state, indent=2).encode())

    lock = threading.Lock()
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="audit", unit="img",
               file=sys.stderr, disable=None if config.progress else True, dynamic_ncols=True)  # no bar off a terminal

    def record(row: dict) -> None:
        with lock:
            store.append(row)
            done[row["item_id"]] = row
            bar.update(1)
        if on_result is not None:
            on_result(row)

    try:
        backend.run(pending, record)
    finally:
        bar.close()
        store.close()
        state["runs"].append({"mode": "server" if config.server else "local", "items": len(pending),
                              "duration_s": round(time.monotonic() - started, 3)})
        _write_atomic(out / STATE_FILE, json.dumps(state, indent=2).encode())

    rows = [done[item.item_id] for item in items if item.item_id in done]
    extra = len(done) - len(rows)
    if extra:
        log(f"{store.path}: {extra} rows are for items no longer in {config.source}; left out of the report")
    return write_reports(out, rows, info, source=str(source), duration_s=time.monotonic() - started,
                         resumed=len(items) - len(pending), thumbnails=config.thumbnails,
                         workers=config.concurrency)
