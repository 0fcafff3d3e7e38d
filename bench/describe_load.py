"""Does the fast defect path keep its latency while reports are being written?

One run, one real server on a loopback port with a model directory that has a language part:

1. ``idle``   - one closed-loop InspectStream camera of 640x480 JPEG frames, nothing else running;
2. ``loaded`` - the same camera while N clients keep asking Describe for reports back to back
   (each waits for its report's last chunk, then asks again). The report clients run in a child
   process, as they would on other machines, so they do not share the server's GIL. Reports are on
   new images (each costs one encoder call in the server's LOW lane) or, with ``--frame-refs``, on
   camera frames already inspected (their cached encoder tokens are reused: decoding only).

The fast path has priority in the server (Describe decodes in its own thread and yields while
frames are queued); the figure of merit is the camera's p99 under load over its idle p99, in
the same run. Describe throughput during the loaded phase is reported beside it.

    python bench/describe_load.py --model MODEL_DIR --describe-clients 4 --frames 200 --out runs/describe.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import threading
import time
from pathlib import Path

import grpc
from serve_latency import LoopThread, bench_grpc, encode_jpeg, machine, render_frames, write_results

from lineinspect.moe_lm.report_model import load_language
from lineinspect.service.config import ServerConfig
from lineinspect.service.server import RunningServer, start_server
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc
from lineinspect.vision.cpu_threads import single_threaded
from lineinspect.vision.model_io import load_inspector


def _request(jpegs: list[bytes], i: int, max_tokens: int, frame_refs: int) -> pb.DescribeRequest:
    """A report on an image sent along, or (frame_refs > 0) on one of the camera's frames already
    inspected: the server reuses that frame's cached encoder tokens instead of encoding again."""
    if frame_refs:
        return pb.DescribeRequest(frame=pb.FrameRef(camera_id="cam0", frame_id=i % frame_refs), max_tokens=max_tokens)
    return pb.DescribeRequest(image=pb.Image(encoded=jpegs[i % len(jpegs)]), max_tokens=max_tokens)


def _ask_reports(port: int, jpegs: list[bytes], first: int, max_tokens: int, frame_refs: int, stop,
                 totals: list[int], lock: threading.Lock) -> None:
    """One client: ask for a report, read it to its last chunk, ask again, until `stop` is set."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        i = first
        while not stop.is_set():
            request = _request(jpegs, i, max_tokens, frame_refs)
            i += 1
            try:
                chunks = list(stub.Describe(request, timeout=120))
            except grpc.RpcError:
                with lock:
                    totals[2] += 1
                continue
            with lock:
                totals[0] += 1
                totals[1] += chunks[-1].tokens if chunks else 0


def _client_process(port: int, jpegs: list[bytes], clients: int, max_tokens: int, frame_refs: int, stop,
                    results) -> None:
    """Runs in its own process, like report clients elsewhere on the network: no shared GIL."""
    totals, lock = [0, 0, 0], threading.Lock()  # reports, tokens, errors
    threads = [threading.Thread(target=_ask_reports, args=(port, jpegs, k, max_tokens, frame_refs, stop, totals, lock))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(totals)


class DescribeLoad:
    """`clients` report clients in a child process, asking back to back until the block ends."""

    def __init__(self, port: int, jpegs: list[bytes], clients: int, max_tokens: int, frame_refs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop, self.results = ctx.Event(), ctx.Queue()
        self.process = ctx.Process(target=_client_process,
                                   args=(port, jpegs, clients, max_tokens, frame_refs, self.stop, self.results))

    def __enter__(self) -> DescribeLoad:
        self.started = time.perf_counter()
        self.process.start()
        time.sleep(3.0)  # the child's imports, then every client has a report in flight
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.reports, self.tokens, self.errors = self.results.get(timeout=300)
        self.process.join()
        self.seconds = time.perf_counter() - self.started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="model directory with a language/ part")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--describe-clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--frames", type=int, default=200, help="measured camera frames per phase")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--frame-refs", action="store_true",
                    help="ask for reports on frames the camera already sent (cached tokens) instead of new images")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    with single_threaded():  # the server's batcher worker owns the CPU threads (vision.cpu_threads)
        inspector = load_inspector(args.model, args.device)
        language = load_language(args.model, args.device)
        jpegs = [encode_jpeg(f, 90) for f in render_frames(16, 0)]
    loop = LoopThread()
    running: RunningServer = loop.run(start_server(ServerConfig(port=0, device=args.device, grace_s=2.0),
                                                   inspector, language=language))
    try:
        idle = bench_grpc(running.port, jpegs, 1, args.frames, args.warmup)
        refs = args.warmup + args.frames if args.frame_refs else 0  # the idle phase's camera frames
        with DescribeLoad(running.port, jpegs, args.describe_clients, args.max_tokens, refs) as load:
            loaded = bench_grpc(running.port, jpegs, 1, args.frames, args.warmup)
    finally:
        loop.run(running.stop(1.0))
        loop.close()
    results = {
        "setup": {"model": str(args.model), "device": args.device, "describe_clients": args.describe_clients,
                  "max_tokens": args.max_tokens, "frames": args.frames,
                  "source": "frame refs" if args.frame_refs else "images", "frame": "640x480 JPEG q90"},
        "machine": {**machine(), "load_average_end": os.getloadavg()},
        "idle": idle, "loaded": loaded,
        "describe": {"reports": load.reports, "tokens": load.tokens, "errors": load.errors,
                     "seconds": round(load.seconds, 1), "tokens_per_s": round(load.tokens / load.seconds, 1)},
        "p99_ratio": round(loaded["p99_ms"] / idle["p99_ms"], 3),
        "p50_ratio": round(loaded["p50_ms"] / idle["p50_ms"], 3),
    }
    print("| phase | p50 ms | p90 ms | p99 ms | frames/s |\n|---|---|---|---|---|")
    for name in ("idle", "loaded"):
        r = results[name]
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['frames_per_s']:.1f} |")
    d = results["describe"]
    print(f"camera p99 loaded/idle = {results['p99_ratio']}x (p50 {results['p50_ratio']}x); Describe during load: "
          f"{d['reports']} reports, {d['tokens']} tokens in {d['seconds']} s = {d['tokens_per_s']} tokens/s, "
          f"{d['errors']} errors")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
