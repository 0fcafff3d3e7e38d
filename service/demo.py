"""`lineinspect demo`: the whole product on one machine, in a few minutes, with no GPU.

1. the default model and its language part (trained on a synthetic line the first time, cached after);
2. the real gRPC server on 127.0.0.1 on a free port, in this process (its own event loop thread);
3. a synthetic 640x480 "camera" (an image folder made from the line's test images, defects
   included) streamed over InspectStream by the real stream client, with a live verdict table;
4. a written inspection report of the camera's worst frame, streamed token by token over
   Describe (the frame's encoder tokens come from the server's cache, not a second encoder pass);
5. a batch audit of the line's test folder through the server, with report.html;
6. a clean shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lineinspect.errors import LineInspectError

CAMERA_ID = "demo-cam-1"
CAMERA_SIZE = (640, 480)  # width, height
DEFAULT_FRAMES = 60
DEFAULT_OUT = Path("lineinspect-demo")
_QUIET_LOGGERS = ("lineinspect.service.server", "lineinspect.service.engine", "lineinspect.service.servicer",
                  "lineinspect.service.batcher")


class _LoopThread:
    """An asyncio loop in a daemon thread; the grpc.aio server lives on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="demo-server-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def make_camera_frames(test_dir: Path, out_dir: Path, frames: int) -> list[Path]:
    """Write `frames` 640x480 JPEGs into `out_dir`, cycling through the test images of every
    class (interleaved, so defects show up early); returns the written paths."""
    import cv2

    from lineinspect.images import encode_jpeg, read_image
    from lineinspect.service.frames import list_images

    if frames < 1:
        raise LineInspectError(f"--frames {frames}: must be >= 1")
    classes = sorted(p for p in Path(test_dir).iterdir() if p.is_dir()) if Path(test_dir).is_dir() else []
    per_class = [list_images(c) for c in classes]
    per_class = [files for files in per_class if files]
    if not per_class:
        raise LineInspectError(f"{test_dir}: no test images; delete {test_dir.parent} and rerun the demo "
                               "to regenerate the synthetic line")
    order: list[Path] = []
    depth = max(len(f) for f in per_class)
    for i in range(depth):
        order.extend(files[i] for files in per_class if i < len(files))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(frames):
        image = cv2.resize(read_image(order[i % len(order)]), CAMERA_SIZE, interpolation=cv2.INTER_LINEAR)
        path = out_dir / f"frame_{i:05d}.jpg"
        path.write_bytes(encode_jpeg(image, 92))
        written.append(path)
    return written


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def stream_report(server: str, frame_id: int, write: Callable[[str], None], max_tokens: int = 64,
                  timeout: float = 60.0) -> dict:
    """Describe one camera frame by reference over gRPC, writing text as it arrives."""
    import grpc

    from lineinspect.service.stream_client import rpc_failure
    from lineinspect.v1 import inspection_pb2 as pb
    from lineinspect.v1 import inspection_pb2_grpc as pb_grpc

    request = pb.DescribeRequest(frame=pb.FrameRef(camera_id=CAMERA_ID, frame_id=frame_id), max_tokens=max_tokens)
    text, tokens, finish = [], 0, ""
    with grpc.insecure_channel(server) as channel:
        try:
            for chunk in pb_grpc.InspectionServiceStub(channel).Describe(request, timeout=timeout):
                if chunk.text:
                    text.append(chunk.text)
                    write(chunk.text)
                tokens, finish = chunk.tokens, chunk.finish_reason or finish
        except grpc.RpcError as exc:
            raise rpc_failure(server, exc) from None
    return {"frame_id": frame_id, "text": "".join(text), "tokens": tokens, "finish_reason": finish}


def run_demo(
    out: Path = DEFAULT_OUT,
    frames: int = DEFAULT_FRAMES,
    device: str = "cpu",
    time_budget: float | None = None,
    language_budget: float | None = None,
    fps: float = 10.0,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    write: Callable[[str], None] | None = None,
) -> dict:
    """Run the demo end to end; return {"stream": summary, "written_report": ..., "audit": summary,
    "report": path, ...}.

    `time_budget` and `language_budget` (seconds) bound training of the default defect model and
    of its language part when they are not cached yet (None: the default budgets); `fps` paces
    the synthetic camera. `echo` prints whole lines, `write` streamed text (both default to stdout)."""
    from lineinspect.moe_lm.report_model import has_language
    from lineinspect.service import defaults
    from lineinspect.service.audit import STATE_FILE as AUDIT_STATE_FILE
    from lineinspect.service.audit import AuditConfig, run_audit
    from lineinspect.service.config import ServerConfig
    from lineinspect.service.describe import load_for_serving
    from lineinspect.service.server import start_server
    from lineinspect.service.stream_client import StreamClient, StreamConfig
    from lineinspect.vision.cpu_threads import single_threaded
    from lineinspect.vision.model_io import CONFIG, load_inspector, resolve_device

    say = echo or (lambda line: print(line, flush=True))
    write = write or (lambda text: print(text, end="", flush=True))
    if frames < 1:
        raise LineInspectError(f"--frames {frames}: must be >= 1")
    if fps <= 0:
        raise LineInspectError(f"fps {fps}: must be > 0")
    resolve_device(device)  # a missing GPU fails now, not after training
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LineInspectError(f"--out {out}: exists and is not a folder; pass another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / AUDIT_STATE_FILE).is_file():
            raise LineInspectError(f"--out {out}: not empty and not an earlier lineinspect report; pass another --out")
        shutil.rmtree(out)  # the demo redoes its report every run (the cached model may have changed)
    t_start = time.monotonic()

    # 1. Model.
    model_dir = defaults.default_model_dir()
    if (model_dir / CONFIG).is_file() and has_language(model_dir):
        say(f"[1/5] model: reusing the cached default model in {model_dir}")
    else:
        budget = defaults.DEFAULT_TIME_BUDGET_S if time_budget is None else time_budget
        if language_budget is None:
            language_budget = defaults.DEFAULT_LANGUAGE_BUDGET_S
        say(f"[1/5] model: training the default tiny model on a synthetic '{defaults.DEFAULT_SURFACE}' line, "
            f"then its report writer (first run only, ~{budget + language_budget:.0f} s; cached in {model_dir})")
        t0 = time.monotonic()
        defaults.ensure_default_model_in_child(time_budget=budget, language_budget=language_budget)
        say(f"      trained in {time.monotonic() - t0:.0f} s")
    data_dir = defaults.ensure_default_data()
    test_dir = data_dir / "test"
    with single_threaded():  # the server's batcher worker owns the CPU threads (vision.cpu_threads)
        inspector = load_inspector(model_dir, device)
        language = load_for_serving(model_dir, inspector.model, device)

    quiet = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    loop = _LoopThread()
    running = None
    camera_root = Path(tempfile.mkdtemp(prefix="lineinspect-demo-camera-"))
    try:
        # 2. Server.
        config = ServerConfig(host="127.0.0.1", port=0, device=device, grace_s=5.0)
        running = loop.run(start_server(config, inspector, language=language))
        server = f"127.0.0.1:{running.port}"
        say(f"[2/5] server: gRPC on {server} (device {device}; fast path and Describe)")

        # 3. Camera stream.
        camera_dir = camera_root / "camera"
        make_camera_frames(test_dir, camera_dir, frames)
        say(f"[3/5] stream: camera '{CAMERA_ID}', {frames} frames {CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} "
            f"at {fps:g} fps from {camera_dir}")
        say(f"      {'frame':>5}  {'verdict':<8} {'score':>7}  {'class':<14} {'latency':>9}")

        verdicts: list[dict] = []

        def emit(event: dict) -> None:
            kind = event.get("event")
            if kind == "verdict":
                verdicts.append(event)
                say(f"      {event['frame_id']:>5}  {event['verdict'].upper():<8} {event['score']:>7.3f}  "
                    f"{(event['defect_class'] or '-'):<14} {event['latency_ms']:>6.1f} ms")
            elif kind == "dropped":
                say(f"      {event['frame_id']:>5}  {'DROPPED':<8} {'':>7}  {event['reason']:<14} "
                    f"{event['latency_ms']:>6.1f} ms")

        client = StreamClient(
            StreamConfig(source=str(camera_dir), server=server, camera_id=CAMERA_ID, fps=fps,
                         max_frames=frames, give_up_after_s=30.0),
            emit=emit,
            log=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True),
        )
        stream = client.run()
        lat = stream["latency_ms"]
        drops = stream["client_drops"] + stream["server_drops"] + stream["lost_in_flight"]
        say(f"      latency p50 {_ms(lat['p50'])}, p99 {_ms(lat['p99'])}; captured {stream['captured']}, "
            f"sent {stream['sent']}, verdicts {stream['verdicts']}, drops {drops} "
            f"(client {stream['client_drops']}, server {stream['server_drops']}, "
            f"lost {stream['lost_in_flight']})")

        # 4. A written report of the worst frame, by reference to the frame the server just inspected.
        written = None
        if verdicts:
            worst = max(verdicts, key=lambda e: e["score"])
            say(f"[4/5] report: frame {worst['frame_id']} ({worst['verdict']}, score {worst['score']:.3f}) "
                "over Describe, as it is written:")
            write("      ")
            written = stream_report(server, int(worst["frame_id"]), write)
            write("\n")
            say(f"      {written['tokens']} tokens ({written['finish_reason']})")

        # 5. Batch audit through the server.
        say(f"[5/5] audit: {test_dir} -> {out} via {server}")
        audit = run_audit(AuditConfig(source=test_dir, out=out, server=server, progress=progress,
                                      give_up_after_s=30.0))
        c = audit["counts"]
        report = out / "report.html"
        if not report.is_file():
            raise LineInspectError(f"audit finished but {report} is missing; check that {out} is writable")
        say(f"      {audit['items']} images: {c['defect']} defect, {c['good']} good, {c['error']} error")
        say(f"      report: {report.resolve()}")
    finally:
        # 5. Shutdown.
        try:
            if running is not None:
                loop.run(running.stop(grace=2.0), timeout=30.0)
        finally:
            loop.close()
            shutil.rmtree(camera_root, ignore_errors=True)
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
    say(f"done in {time.monotonic() - t_start:.0f} s; server stopped.")
    return {"stream": stream, "written_report": written, "audit": audit, "report": str(report), "server": server,
            "model_dir": str(model_dir)}
