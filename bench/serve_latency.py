"""Serving latency: model-only vs in-process engine vs end-to-end InspectStream over loopback gRPC.

One run measures, on the same machine state and the same 640x480 JPEG frames (synthetic line
surfaces, some with a defect painted in, JPEG quality 90):

1. ``model``  - ``Inspector.inspect_batch([frame])`` on an already-decoded frame, batch 1 (what
   the engine's batch worker calls: resize, model, scores, boxes);
2. ``engine`` - ``InspectionEngine.inspect(jpeg)`` on the server's event loop, no gRPC: decode,
   batcher, model, post-processing;
3. ``grpc``   - InspectStream over 127.0.0.1 from 1..N concurrent streams (one thread, channel and
   camera id each), closed loop: each stream sends its next frame when the previous reply came,
   so a frame's latency is its service time.

The server is a real one (``start_server``, as the tests start it) on a free port, in this
process; the client threads share the process (and its GIL) with it, like a camera gateway on
the inspection host. Replies carry the server's per-stage timings; their medians are reported
beside the client-side percentiles. ``overhead`` is the path's p50 minus the model-only p50;
``non-model`` is the median of each frame's latency minus its own batch call, which does not
move when the machine's load drifts between the phases.

    python bench/serve_latency.py --preset tiny --streams 1 8 --frames 200 --out runs/latency.json
    python bench/serve_latency.py --model MODEL_DIR --device cuda --max-batch 16 --max-delay-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import grpc
import numpy as np
import torch

from lineinspect.service.config import ServerConfig
from lineinspect.service.engine import EncodedImage, InspectionEngine
from lineinspect.service.server import RunningServer, start_server
from lineinspect.training.defects import DEFECT_TYPES, render_defect
from lineinspect.training.surfaces import SURFACES, make_surface
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc
from lineinspect.vision.cpu_threads import single_threaded
from lineinspect.vision.inspector import Inspector
from lineinspect.vision.model_io import load_inspector, untrained_inspector

T = TypeVar("T")
WIDTH, HEIGHT = 640, 480
STAGES = ("queue_ms", "decode_ms", "model_ms", "post_ms", "total_ms", "batch_size")
COLUMNS = ("non_model_ms", "queue_ms", "decode_ms", "model_ms", "post_ms", "other_ms", "total_ms", "network_ms")


# ------------------------------------------------------------------------------ inputs


def render_frames(count: int, seed: int) -> list[np.ndarray]:
    """`count` RGB uint8 640x480 frames: the four synthetic surfaces in turn, every other one
    with a defect painted in."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        image = make_surface(SURFACES[i % len(SURFACES)], WIDTH, rng)  # square, WIDTH px
        if i % 2:
            image, _ = render_defect(image, DEFECT_TYPES[i % len(DEFECT_TYPES)], rng)
        frames.append(cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))
    return frames


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """RGB uint8 -> JPEG bytes with OpenCV, the way a camera client encodes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def build_inspector(args: argparse.Namespace) -> Inspector:
    """The model directory's inspector, or an untrained one of the preset (latency does not
    depend on the weights, except that frames judged defective also get boxes). Loaded without
    starting CPU threads here: the server's worker thread owns them, as in `lineinspect serve`."""
    with single_threaded():
        if args.model is not None:
            return load_inspector(args.model, args.device, cuda_graphs=args.cuda_graphs, precision=args.precision)
        return untrained_inspector(args.preset, args.device, num_classes=args.classes, cuda_graphs=args.cuda_graphs)


# ------------------------------------------------------------------------------ statistics


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """Percentiles of latency samples in ms."""
    a = np.asarray(samples_ms, dtype=np.float64)
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
    }


def stage_row(timings: dict[str, float], latency_ms: float) -> dict[str, float]:
    """A reply's server stages plus three derived columns: `non_model_ms` (client latency minus
    the batch call of the same frame: the serving overhead, immune to load drifting between
    phases), `other_ms` (server time outside queue, decode and the batch call: event loop,
    thread hand-overs, heatmap PNG) and `network_ms` (client latency minus server total: gRPC,
    serialisation, loopback). The inspector's own post-processing runs inside the batch call,
    so post_ms overlaps model_ms and is not subtracted."""
    inside = sum(timings[k] for k in ("queue_ms", "decode_ms", "model_ms"))
    return {**timings, "non_model_ms": latency_ms - timings["model_ms"],
            "other_ms": timings["total_ms"] - inside, "network_ms": latency_ms - timings["total_ms"]}


def stage_medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Median of each column over the replies."""
    return {key: float(np.median([r[key] for r in rows])) for key in rows[0]} if rows else {}


# ------------------------------------------------------------------------------ server loop


class LoopThread:
    """An asyncio event loop in a daemon thread, the way a server process runs grpc.aio."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-aio-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 3600.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


# ------------------------------------------------------------------------------ measurements


def bench_model(inspector: Inspector, frames: list[np.ndarray], n: int, warmup: int) -> dict:
    """Model-only: inspect_batch on one decoded frame at a time (batch 1)."""
    samples, defects = [], 0
    for i in range(warmup + n):
        image = frames[i % len(frames)]
        t0 = time.perf_counter()
        result = inspector.inspect_batch([image])[0]
        elapsed = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            samples.append(elapsed)
            defects += result.is_defect
    return {**summarize(samples), "defect_fraction": defects / n}


def bench_model_batch(inspector: Inspector, frames: list[np.ndarray], batch: int, calls: int) -> dict:
    """Model-only throughput: inspect_batch on `batch` decoded frames per call (the bare rate a
    server's frames/s is compared with)."""
    images = [frames[i % len(frames)] for i in range(batch)]
    inspector.inspect_batch(images)  # warm
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        inspector.inspect_batch(images)
        samples.append((time.perf_counter() - t0) * 1000)
    stats = summarize(samples)
    return {**stats, "batch": batch, "frames_per_s": batch * 1000 / stats["p50_ms"]}


async def _engine_samples(engine: InspectionEngine, jpegs: list[bytes], n: int,
                          warmup: int) -> tuple[list[float], list[dict[str, float]]]:
    samples, stages = [], []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        result = await engine.inspect(EncodedImage(jpegs[i % len(jpegs)]))
        elapsed = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            samples.append(elapsed)
            timings = {f"{k}_ms": v for k, v in result.timings_ms.items()} | {"batch_size": result.batch_size}
            stages.append(stage_row(timings, elapsed))
    return samples, stages


def bench_engine(loop: LoopThread, engine: InspectionEngine, jpegs: list[bytes], n: int, warmup: int) -> dict:
    """The engine path without the network: JPEG bytes in, EngineResult out, on the server loop."""
    samples, stages = loop.run(_engine_samples(engine, jpegs, n, warmup))
    return {**summarize(samples), "server_stages_p50": stage_medians(stages)}


@dataclass
class StreamLog:
    """What one closed-loop stream saw after its warm-up frames."""

    latencies_ms: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    first_send: float | None = None
    last_reply: float = 0.0
    drops: int = 0


def run_stream(port: int, camera_id: str, jpegs: list[bytes], frames: int, warmup: int,
               start_at: float, seconds: float | None = None) -> StreamLog:
    """One camera: an InspectStream call on its own channel, one frame in flight at a time,
    starting at perf_counter time `start_at` (the same clock in every process of this machine).
    It sends `warmup` frames, then `frames` measured ones, or measured ones for `seconds`."""
    log = StreamLog()
    turn = threading.Semaphore(1)
    sent_at: dict[int, float] = {}

    def requests() -> Iterator[pb.Frame]:
        stop_at = math.inf
        for i in itertools.count():
            turn.acquire()
            now = time.perf_counter()
            if i == warmup:
                log.first_send = now
                stop_at = now + seconds if seconds else math.inf
            if (i >= warmup + frames and not seconds) or now >= stop_at:
                return
            sent_at[i] = now
            yield pb.Frame(camera_id=camera_id, frame_id=i, image=pb.Image(encoded=jpegs[i % len(jpegs)]))

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = pb_grpc.InspectionServiceStub(channel)
        time.sleep(max(0.0, start_at - time.perf_counter()))
        for reply in stub.InspectStream(requests()):
            now = time.perf_counter()
            if reply.frame_id >= warmup:
                _record(log, reply, (now - sent_at[reply.frame_id]) * 1000, now)
            turn.release()
    return log


def stream_group(ports: list[int], jpegs: list[bytes], cameras: list[int], frames: int, warmup: int,
                 start_at: float, seconds: float | None) -> list[StreamLog]:
    """Cameras `cameras`, one thread each, in this process; camera k talks to ports[k % len(ports)]
    (one server replica per stream, as a round-robin client balancer pins each stream)."""
    logs: list[StreamLog | BaseException | None] = [None] * len(cameras)

    def worker(i: int, k: int) -> None:
        try:
            logs[i] = run_stream(ports[k % len(ports)], f"cam{k}", jpegs[k:] + jpegs[:k], frames, warmup,
                                 start_at, seconds)
        except BaseException as exc:  # reported below, in the calling thread
            logs[i] = exc

    threads = [threading.Thread(target=worker, args=(i, k), name=f"stream-{k}") for i, k in enumerate(cameras)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = []
    for entry in logs:
        if not isinstance(entry, StreamLog):
            raise entry or RuntimeError("a stream thread ended without a result")
        done.append(entry)
    return done


def _record(log: StreamLog, reply: pb.FrameResult, latency_ms: float, now: float) -> None:
    if reply.WhichOneof("outcome") != "verdict":
        log.drops += 1
        return
    log.latencies_ms.append(latency_ms)
    log.stages.append(stage_row({key: float(getattr(reply.timings, key)) for key in STAGES}, latency_ms))
    log.last_reply = now


def bench_grpc(ports: list[int], jpegs: list[bytes], streams: int, frames: int, warmup: int,
               seconds: float | None = None, client_processes: int = 1) -> dict:
    """`streams` concurrent closed-loop InspectStream calls of `frames` measured frames each (or
    `seconds` each), from threads of this process or spread over `client_processes` processes
    (cameras are other machines: their clients should not share the server's GIL)."""
    if client_processes <= 1:
        done = stream_group(ports, jpegs, list(range(streams)), frames, warmup, time.perf_counter() + 1.0, seconds)
    else:
        groups = [list(range(streams))[p::client_processes] for p in range(client_processes)]
        start_at = time.perf_counter() + 20.0  # spawned processes import torch and connect first
        with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(stream_group, ports, jpegs, g, frames, warmup, start_at, seconds)
                       for g in groups if g]
            done = [log for f in futures for log in f.result()]
    latencies = [x for log in done for x in log.latencies_ms]
    wall = max(log.last_reply for log in done) - min(log.first_send or math.inf for log in done)
    return {
        **summarize(latencies),
        "streams": streams,
        "replicas": len(ports),
        "client_processes": client_processes,
        "wall_s": wall,
        "frames_per_s": len(latencies) / wall if wall > 0 else 0.0,
        "drops": sum(log.drops for log in done),
        "server_stages_p50": stage_medians([row for log in done for row in log.stages]),
    }


# ------------------------------------------------------------------------------ replicas


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_replicas(args: argparse.Namespace, config: ServerConfig, count: int) -> list[tuple[subprocess.Popen, int]]:
    """`count` more servers of the same model as `lineinspect serve` processes on free ports, each
    with its own copy of the model (and graphs) on the device; returns once all are ready."""
    model = ["--model", str(args.model)] if args.model is not None else ["--untrained", args.preset]
    replicas = []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-c", "import sys; from lineinspect.service.cli import main; sys.exit(main())",
               "serve", *model, "--device", args.device, "--port", str(port), "--precision", args.precision,
               "--max-batch", str(config.max_batch), "--min-batch", str(config.min_batch),
               "--max-delay-ms", str(config.max_delay_ms), "--decode-workers", str(config.decode_threads),
               "--jpeg-decode", config.jpeg_decode]
        if not args.cuda_graphs:
            cmd.append("--no-cuda-graphs")
        replicas.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port))
    for proc, port in replicas:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=300)
            except grpc.FutureTimeoutError:
                stop_replicas(replicas)
                raise RuntimeError(f"replica on port {port} not ready in 300 s (exit code {proc.poll()})") from None
    return replicas


def stop_replicas(replicas: list[tuple[subprocess.Popen, int]]) -> None:
    for proc, _ in replicas:
        proc.terminate()
    for proc, _ in replicas:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------ report


def table(results: dict) -> str:
    """The results as a markdown table, one row per path."""
    model_p50 = results["model"]["p50_ms"]
    header = ("| path | streams | p50 ms | p90 ms | p99 ms | frames/s | overhead p50 ms | non-model | srv queue "
              "| srv decode | srv model | srv post | srv other | srv total | network | batch |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def row(path: str, streams: str, r: dict) -> str:
        s = r.get("server_stages_p50", {})
        fps = f"{r['frames_per_s']:.1f}" if "frames_per_s" in r else f"{1000 / r['mean_ms']:.1f}"
        cells = [path, streams, f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", fps,
                 f"{r['p50_ms'] - model_p50:+.1f}"]
        cells += [f"{s[k]:.1f}" if k in s else "–" for k in COLUMNS]
        cells.append(f"{s['batch_size']:.0f}" if "batch_size" in s else "1")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("model only (inspect_batch)", "–", results["model"]))
    mb = results["model_batch"]
    lines.append(f"| model only, batch {mb['batch']} | – | {mb['p50_ms']:.1f} | {mb['p90_ms']:.1f} | "
                 f"{mb['p99_ms']:.1f} | {mb['frames_per_s']:.0f} |" + " |" * (header.count("|") - 7))
    lines.append(row("engine, no gRPC", "1", results["engine"]))
    for streams, r in results["grpc"].items():
        lines.append(row("gRPC InspectStream", streams, r))
    return "\n".join(lines)


def write_results(results: dict, out: Path | None) -> None:
    """The run's results as indented JSON at `out` (folders made as needed), if given."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


def machine() -> dict:
    return {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


# ------------------------------------------------------------------------------ main


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="untrained model of this preset when no --model (default tiny)")
    ap.add_argument("--model", type=Path, help="model directory to serve instead of an untrained preset")
    ap.add_argument("--classes", type=int, default=0, metavar="K",
                    help="defect kinds the untrained preset names (default 0; 7 runs a named line's crop namer)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="with --model: inference precision (auto: bf16 where the device computes it natively)")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="on CUDA, serve the eager model instead of CUDA graphs (the baseline)")
    ap.add_argument("--streams", type=positive, nargs="+", default=[1, 8], help="stream counts to run (default 1 8)")
    ap.add_argument("--frames", type=positive, default=200, help="measured frames per stream and per in-process path")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured frames first (default 10)")
    ap.add_argument("--max-batch", type=positive, default=ServerConfig.max_batch, help="server batcher setting")
    ap.add_argument("--min-batch", type=positive, default=ServerConfig.min_batch,
                    help="server batcher setting (capped at --max-batch)")
    ap.add_argument("--max-delay-ms", type=float, default=ServerConfig.max_delay_ms, help="server batcher setting")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--distinct-frames", type=positive, default=16, help="different frames to cycle through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=None,
                    help="gRPC phases: each stream sends measured frames for this long instead of --frames")
    ap.add_argument("--client-processes", type=positive, default=1,
                    help="spread the gRPC streams over this many client processes (default 1: threads of this one)")
    ap.add_argument("--replicas", type=positive, default=1,
                    help="server replicas: this process's server plus N-1 `lineinspect serve` processes; "
                    "stream k goes to replica k mod N (default 1)")
    ap.add_argument("--decode-workers", type=int, default=0, help="server decode threads (default 0: by device)")
    ap.add_argument("--jpeg-decode", choices=("auto", "cpu", "gpu"), default="auto",
                    help="where the server decodes JPEG frames (default auto: nvJPEG on a CUDA device)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.classes and args.replicas > 1 and args.model is None:
        raise SystemExit("--classes names kinds in this process's untrained model only; "
                         "replicas serve `--untrained PRESET` without them: use --model for replicas")
    inspector = build_inspector(args)
    with single_threaded():
        frames = render_frames(args.distinct_frames, args.seed)
    jpegs = [encode_jpeg(f, args.jpeg_quality) for f in frames]
    config = ServerConfig(port=0, device=args.device, min_batch=min(args.min_batch, args.max_batch),
                          max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, grace_s=2.0,
                          decode_workers=args.decode_workers, jpeg_decode=args.jpeg_decode)
    results: dict[str, Any] = {
        "setup": {"preset": inspector.preset, "model": str(args.model) if args.model else None, "classes": args.classes,
                  "device": args.device, "frame": f"{WIDTH}x{HEIGHT} JPEG q{args.jpeg_quality}",
                  "jpeg_kib_mean": float(np.mean([len(j) for j in jpegs]) / 1024), "frames": args.frames,
                  "warmup": args.warmup, "min_batch": config.min_batch, "max_batch": config.max_batch,
                  "max_delay_ms": config.max_delay_ms, "cuda_graphs": inspector.info()["cuda_graphs"],
                  "precision": str(getattr(inspector, "autocast_dtype", None) or "fp32"),
                  "decode_threads": config.decode_threads, "jpeg_decode": args.jpeg_decode, "replicas": args.replicas,
                  "client_processes": args.client_processes, "seconds": args.seconds},
        "machine": machine(),
    }
    loop = LoopThread()
    running: RunningServer = loop.run(start_server(config, inspector))
    replicas = start_replicas(args, config, args.replicas - 1) if args.replicas > 1 else []
    ports = [running.port] + [port for _, port in replicas]
    results["setup"]["jpeg_on_device"] = running.engine.device_jpeg is not None
    try:
        # on the server's worker thread, the one thread that runs the model (vision.cpu_threads)
        results["model"] = loop.run(running.engine.batcher.run_on_worker(
            bench_model, inspector, frames, args.frames, args.warmup))
        results["model_batch"] = loop.run(running.engine.batcher.run_on_worker(
            bench_model_batch, inspector, frames, config.max_batch, 20 if args.device.startswith("cuda") else 3))
        results["engine"] = bench_engine(loop, running.engine, jpegs, args.frames, args.warmup)
        results["grpc"] = {str(s): bench_grpc(ports, jpegs, s, args.frames, args.warmup, args.seconds,
                                              args.client_processes)
                           for s in args.streams}
        for r in results["grpc"].values():
            r["vs_model_batch"] = r["frames_per_s"] / results["model_batch"]["frames_per_s"]
    finally:
        stop_replicas(replicas)
        loop.run(running.stop(1.0))
        loop.close()
    results["machine"]["load_average_end"] = os.getloadavg()
    print(table(results))
    write_results(results, args.out)


if __name__ == "__main__":
    main()
