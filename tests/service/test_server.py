"""The gRPC server end to end: a real grpc.aio server on a free port, real stubs, the real
(untrained tiny) fast path."""

from __future__ import annotations

import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import Iterator

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lineinspect.errors import LineInspectError
from lineinspect.service.stream_client import open_channel
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc

Code = grpc.StatusCode


def frames(media, cameras: tuple[str, ...], per_camera: int) -> list[pb.Frame]:
    """Frames of several cameras, interleaved."""
    image = media.image()
    return [pb.Frame(camera_id=cam, frame_id=i, image=image) for i in range(per_camera) for cam in cameras]


def raw(pixels: bytes, height: int, width: int, channels: int, dtype: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=height, width=width, channels=channels, dtype=dtype))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (the pixels are never there)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def bad_images(media) -> dict[str, tuple[pb.Image, str]]:
    """name -> (image, a word the INVALID_ARGUMENT message must contain)."""
    jpg = media.jpeg(media.sample())
    pixels = media.sample().tobytes()
    return {
        "zero_bytes": (pb.Image(encoded=b""), "empty"),
        "no_image": (pb.Image(), "no image"),
        "corrupt_jpeg": (pb.Image(encoded=jpg[:20] + bytes(range(256)) * 4), "not a decodable image"),
        "truncated_jpeg": (pb.Image(encoded=jpg[: len(jpg) // 2]), "truncated"),
        "png_50000x50000": (pb.Image(encoded=png_declaring(50000, 50000)), "50000x50000"),
        "raw_length_mismatch": (raw(pixels[:-5], 48, 64, 3, pb.RawImage.UINT8), "bytes but"),
        "raw_uint16_for_uint8_bytes": (raw(pixels, 48, 64, 3, pb.RawImage.UINT16), "bytes but"),
        "raw_dtype_unset": (raw(pixels, 48, 64, 3, pb.RawImage.PIXEL_TYPE_UNSPECIFIED), "pixel type"),
        "raw_dtype_unknown": (raw(pixels, 48, 64, 3, 7), "pixel type"),
        "raw_two_channels": (raw(pixels[: 48 * 64 * 2], 48, 64, 2, pb.RawImage.UINT8), "channels"),
        "raw_zero_size": (raw(b"", 0, 64, 3, pb.RawImage.UINT8), "empty size"),
    }


BAD_NAMES = ("zero_bytes", "no_image", "corrupt_jpeg", "truncated_jpeg", "png_50000x50000", "raw_length_mismatch",
             "raw_uint16_for_uint8_bytes", "raw_dtype_unset", "raw_dtype_unknown", "raw_two_channels",
             "raw_zero_size")


class FrameFeed:
    """A request iterator the test pushes frames into while reading results."""

    def __init__(self) -> None:
        self._queue: queue.Queue[pb.Frame | None] = queue.Queue()

    def send(self, frame: pb.Frame) -> None:
        self._queue.put(frame)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[pb.Frame]:
        while (frame := self._queue.get()) is not None:
            yield frame


# ------------------------------------------------------------------------------ round trips


def test_unary_round_trip_with_heatmap(stub, media) -> None:
    image = media.sample(48, 64)
    reply = stub.Inspect(pb.InspectRequest(request_id="r-1", image=pb.Image(encoded=media.jpeg(image)),
                                           options=pb.InspectOptions(want_heatmap=True)), timeout=30)
    assert reply.request_id == "r-1"
    v = reply.verdict
    assert 0.0 <= v.score <= 1.0 and v.is_defect == (v.score >= v.threshold)
    assert (v.image_width, v.image_height) == (64, 48)
    heat = cv2.imdecode(np.frombuffer(v.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert heat.shape == (48, 64) and heat.dtype == np.uint8
    t = reply.timings
    assert t.total_ms > 0 and t.model_ms > 0 and t.batch_size >= 1
    assert t.total_ms >= t.queue_ms
    plain = stub.Inspect(pb.InspectRequest(image=pb.Image(encoded=media.png(image))), timeout=30)
    assert plain.verdict.heatmap_png == b""  # only when asked


def test_large_jpeg_decoded_shrunk_still_answers_in_its_own_pixels(stub, tiny_inspector, media) -> None:
    """A JPEG four times the model's input side is decoded at a quarter size (libjpeg's DCT
    scaling) yet its verdict, heatmap and boxes are in the frame's own pixels, and its score
    agrees with inspecting the fully decoded frame."""
    side = tiny_inspector.input_size
    image = cv2.resize(media.sample(48, 64, seed=5), (4 * side + 8, 4 * side), interpolation=cv2.INTER_NEAREST)
    data = media.jpeg(image)
    reply = stub.Inspect(pb.InspectRequest(image=pb.Image(encoded=data),
                                           options=pb.InspectOptions(want_heatmap=True)), timeout=30)
    v = reply.verdict
    assert (v.image_width, v.image_height) == (4 * side + 8, 4 * side)
    heat = cv2.imdecode(np.frombuffer(v.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert heat.shape == (4 * side, 4 * side + 8)
    assert all(0 <= b.x0 < b.x1 <= 4 * side + 8 and 0 <= b.y0 < b.y1 <= 4 * side for b in v.boxes)
    full = tiny_inspector.inspect_batch([cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                                      cv2.COLOR_BGR2RGB)])[0]
    assert v.score == pytest.approx(full.score, abs=0.05)


def test_raw_pixels_match_the_encoded_verdict(stub, media) -> None:
    image = media.sample(40, 56, seed=3)
    encoded = stub.Inspect(pb.InspectRequest(image=pb.Image(encoded=media.png(image))), timeout=30).verdict
    rgb = stub.Inspect(pb.InspectRequest(image=raw(image.tobytes(), 40, 56, 3, pb.RawImage.UINT8)),
                       timeout=30).verdict
    assert rgb.score == pytest.approx(encoded.score, abs=1e-4)
    rgba = np.concatenate([image, np.full((40, 56, 1), 255, np.uint8)], axis=2)
    assert stub.Inspect(pb.InspectRequest(image=raw(rgba.tobytes(), 40, 56, 4, pb.RawImage.UINT8)),
                        timeout=30).verdict.score == pytest.approx(encoded.score, abs=1e-4)
    grey16 = (image[:, :, 0].astype("<u2") * 257).tobytes()
    v16 = stub.Inspect(pb.InspectRequest(image=raw(grey16, 40, 56, 1, pb.RawImage.UINT16)), timeout=30).verdict
    assert (v16.image_width, v16.image_height) == (56, 40)


def test_model_info_describe_health_and_reflection(server, stub, connect) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.preset == "tiny" and info.input_size > 0 and info.params > 0 and info.device == "cpu"
    assert (info.batcher.min_batch, info.batcher.max_batch, info.batcher.queue_capacity) == (4, 64, 256)
    assert info.max_message_bytes == 32 * 1024 * 1024 and info.server_version
    assert (info.score_source, info.map_source) == ("head", "head")  # an untrained model: the head's score and map

    with pytest.raises(grpc.RpcError) as err:
        list(stub.Describe(pb.DescribeRequest(question="what is wrong?"), timeout=10))
    assert err.value.code() == Code.UNIMPLEMENTED and "language path" in err.value.details()

    channel = connect.channel(server.port)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lineinspect.v1.InspectionService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"lineinspect.v1.InspectionService", "grpc.health.v1.Health"} <= names


def test_stream_keeps_per_camera_order_with_two_cameras_interleaved(stub, media) -> None:
    sent = frames(media, ("cam-a", "cam-b"), 12)
    results = list(stub.InspectStream(iter(sent), timeout=60))
    assert len(results) == len(sent)
    by_camera = defaultdict(list)
    for r in results:
        assert r.WhichOneof("outcome") == "verdict", r
        by_camera[r.camera_id].append(r.frame_id)
    assert by_camera == {"cam-a": list(range(12)), "cam-b": list(range(12))}


def test_audit_answers_every_item_with_verdict_or_error(stub, media) -> None:
    items = [pb.AuditItem(item_id=f"good-{i}", image=media.image(seed=i)) for i in range(6)]
    items.insert(3, pb.AuditItem(item_id="broken", image=pb.Image(encoded=b"not an image")))
    results = {r.item_id: r for r in stub.Audit(iter(items), timeout=60)}
    assert set(results) == {i.item_id for i in items}
    assert results["broken"].error.code == "INVALID_ARGUMENT"
    assert "decodable" in results["broken"].error.message
    assert all(results[f"good-{i}"].WhichOneof("outcome") == "verdict" for i in range(6))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_image_is_invalid_argument_and_server_keeps_serving(stub, media, name: str) -> None:
    image, words = bad_images(media)[name]
    with pytest.raises(grpc.RpcError) as err:
        stub.Inspect(pb.InspectRequest(image=image), timeout=30)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert words in err.value.details(), err.value.details()
    assert stub.Inspect(pb.InspectRequest(image=media.image()), timeout=30).verdict.image_width == 64


def test_bad_frames_become_drops_and_the_stream_goes_on(stub, media) -> None:
    bad = bad_images(media)
    sent = []
    for i, name in enumerate(BAD_NAMES):
        sent.append(pb.Frame(camera_id="cam", frame_id=2 * i, image=bad[name][0]))
        sent.append(pb.Frame(camera_id="cam", frame_id=2 * i + 1, image=media.image()))
    results = list(stub.InspectStream(iter(sent), timeout=60))
    assert [r.frame_id for r in results] == list(range(len(sent)))
    for i, name in enumerate(BAD_NAMES):
        dropped, good = results[2 * i], results[2 * i + 1]
        expected = pb.Drop.TOO_LARGE if name == "png_50000x50000" else pb.Drop.INVALID_IMAGE
        assert dropped.WhichOneof("outcome") == "dropped" and dropped.dropped.reason == expected, name
        assert bad[name][1] in dropped.dropped.detail
        assert good.WhichOneof("outcome") == "verdict"


def test_oversized_message_is_resource_exhausted_and_server_survives(server_factory, connect, media) -> None:
    small = server_factory(max_message_mb=1)
    stub = connect.stub(small.port, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    huge = pb.InspectRequest(image=pb.Image(encoded=b"\xff\xd8" + bytes(2 * 1024 * 1024)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Inspect(huge, timeout=30)
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert stub.Inspect(pb.InspectRequest(image=media.image()), timeout=30).verdict.image_width == 64


# ------------------------------------------------------------------------------ streams under stress


class SlowInspector:
    """The real tiny inspector, slowed down per model call, counting what it inspected."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s, self.inspected = inner, delay_s, 0
        self.input_size = inner.input_size

    def run_batch(self, images):
        time.sleep(self.delay_s)
        self.inspected += len(images)
        return self.inner.run_batch(images)

    def finish(self, out, size, heatmap=False):
        return self.inner.finish(out, size, heatmap)

    def info(self) -> dict:
        return self.inner.info()


class ThreadRecordingInspector(SlowInspector):
    """Records which thread made each model call."""

    def __init__(self, inner) -> None:
        super().__init__(inner, delay_s=0.0)
        self.threads: list[str] = []

    def run_batch(self, images):
        self.threads.append(threading.current_thread().name)
        return super().run_batch(images)


class FinishRecordingInspector(SlowInspector):
    """Records which thread made each frame's verdict (`finish`)."""

    def __init__(self, inner) -> None:
        super().__init__(inner, delay_s=0.05)
        self.finish_threads: list[str] = []

    def finish(self, out, size, heatmap=False):
        self.finish_threads.append(threading.current_thread().name)
        return super().finish(out, size, heatmap)


def test_verdicts_left_to_the_pool_while_work_waits_are_the_direct_ones(server_factory, connect, tiny_inspector,
                                                                         media) -> None:
    # With frames waiting for the model, the batch worker leaves verdicts and heatmaps to the decode
    # pool (the device gets its next batch sooner); the last batch, with nothing waiting, makes its own.
    recording = FinishRecordingInspector(tiny_inspector)
    running = server_factory(inspector=recording, max_batch=2, min_batch=1, max_delay_ms=0)
    stub = connect.stub(running.port)
    images = [media.sample(48 + 8 * (i % 3), 64, seed=i) for i in range(10)]
    calls = [stub.Inspect.future(pb.InspectRequest(image=pb.Image(encoded=media.png(image)),
                                                   options=pb.InspectOptions(want_heatmap=True)), timeout=60)
             for image in images]
    replies = [c.result() for c in calls]
    pooled = [name for name in recording.finish_threads if name.startswith("lineinspect-decode")]
    assert pooled and len(pooled) < len(images), recording.finish_threads
    for reply, image, direct in zip(replies, images, tiny_inspector.inspect_batch(images, heatmaps=True), strict=True):
        v = reply.verdict
        assert (v.image_height, v.image_width) == image.shape[:2]
        assert v.score == pytest.approx(direct.score, abs=1e-4) and v.is_defect == direct.is_defect
        heat = cv2.imdecode(np.frombuffer(v.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert heat.shape == image.shape[:2]
        assert np.abs(heat / 255.0 - direct.heatmap).max() < 0.01


def test_a_client_balances_calls_over_server_replicas(server_factory, tiny_inspector, media) -> None:
    # Replicas behind gRPC's round_robin: `--server A,B` in the CLI clients (stream, audit, ask).
    replicas = [SlowInspector(tiny_inspector, delay_s=0.0) for _ in range(2)]
    ports = [server_factory(inspector=r).port for r in replicas]
    with open_channel(",".join(f"127.0.0.1:{p}" for p in ports)) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)

        def inspect() -> None:
            assert stub.Inspect(pb.InspectRequest(image=media.image()), timeout=30).HasField("verdict")

        for _ in range(20):  # round_robin uses a replica once its connection is up
            if min(r.inspected for r in replicas) > 0:
                break
            inspect()
        assert min(r.inspected for r in replicas) > 0, [r.inspected for r in replicas]
        before = [r.inspected for r in replicas]
        for _ in range(8):  # both up: the calls alternate
            inspect()
    assert [r.inspected - b for r, b in zip(replicas, before, strict=True)] == [4, 4]
    with pytest.raises(LineInspectError, match="IPv4"):
        open_channel(f"localhost:{ports[0]},127.0.0.1:{ports[1]}")


def test_every_model_call_warm_up_included_runs_on_one_thread(server_factory, connect, tiny_inspector,
                                                              media) -> None:
    # One thread owns the model's CPU threads: a second thread running torch ops made every call
    # 2-3x slower on a 2-core CPU (vision.cpu_threads).
    recording = ThreadRecordingInspector(tiny_inspector)
    running = server_factory(inspector=recording, warmup=True, max_batch=2, min_batch=1, max_delay_ms=0)
    assert recording.threads, "the server warms the model up before it serves"
    stub = connect.stub(running.port)
    futures = [stub.Inspect.future(pb.InspectRequest(image=media.image(seed=i)), timeout=30) for i in range(6)]
    assert all(f.result().verdict.image_width == 64 for f in futures)
    list(stub.InspectStream(iter(frames(media, ("cam",), 4)), timeout=30))
    assert len(recording.threads) >= 3  # the warm-up and at least two batches
    assert len(set(recording.threads)) == 1 and recording.threads[0].startswith("inspect-worker")


def test_client_cancelling_mid_stream_frees_its_work(server_factory, connect, tiny_inspector, media) -> None:
    slow = SlowInspector(tiny_inspector, delay_s=0.05)
    running = server_factory(inspector=slow, max_batch=2, min_batch=1, max_delay_ms=0)
    stub = connect.stub(running.port)
    feed = FrameFeed()
    call = stub.InspectStream(iter(feed), timeout=60)
    for frame in frames(media, ("cam",), 40):  # ~20 model calls of 50 ms queued up
        feed.send(frame)
    assert next(call).frame_id == 0
    deadline = time.monotonic() + 10
    while running.engine.batcher.depth() < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.engine.batcher.depth() >= 10
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == Code.CANCELLED
    deadline = time.monotonic() + 0.5  # far less than the queued work would take
    while running.engine.batcher.depth() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.engine.batcher.depth() == 0  # the gone client's frames left the queue
    time.sleep(0.2)
    assert slow.inspected < 30  # ... and never reached the model
    assert stub.Inspect(pb.InspectRequest(image=media.image()), timeout=30).verdict.image_width == 64
    results = list(stub.InspectStream(iter(frames(media, ("cam",), 3)), timeout=30))
    assert [r.frame_id for r in results] == [0, 1, 2]


def test_work_whose_deadline_passed_never_reaches_the_model(server_factory, connect, tiny_inspector,
                                                            media) -> None:
    # Generous margins: the first frame to arrive must reach the idle worker within frame_timeout_ms
    # even on a slow shared CI machine, while the frames behind it wait a whole delay_s.
    slow = SlowInspector(tiny_inspector, delay_s=2.0)
    running = server_factory(inspector=slow, max_batch=1, min_batch=1, max_delay_ms=0, frame_timeout_ms=1000)
    stub = connect.stub(running.port)
    busy = stub.Inspect.future(pb.InspectRequest(image=media.image()), timeout=30)  # holds the worker
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as err:
        stub.Inspect(pb.InspectRequest(image=media.image(seed=1)), timeout=0.3)
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    assert busy.result().verdict.image_width == 64
    assert slow.inspected == 1, "the late request must be dropped from the queue, not run"
    # Stream frames waiting longer than frame_timeout_ms come back as DEADLINE_EXCEEDED drops.
    results = list(stub.InspectStream(iter(frames(media, ("cam",), 4)), timeout=30))
    outcomes = [r.WhichOneof("outcome") for r in results]
    detail = [(r.frame_id, o, r.dropped.detail if o == "dropped" else "") for r, o in zip(results, outcomes)]
    # Frames decode in parallel, so on a loaded machine frame 1 may reach the queue before frame 0:
    # whichever arrives first is inspected, the ones behind it wait out the 2 s and are dropped.
    assert [r.frame_id for r in results] == [0, 1, 2, 3] and outcomes.count("verdict") >= 1, detail
    late = [r for r in results if r.WhichOneof("outcome") == "dropped"]
    assert late and all(r.dropped.reason == pb.Drop.DEADLINE_EXCEEDED for r in late), detail
    assert slow.inspected == 1 + outcomes.count("verdict"), (slow.inspected, detail)


def test_flooding_stream_gets_exactly_one_result_per_frame(server_factory, connect, media) -> None:
    tiny_queue = server_factory(queue_size=2, max_batch=2, min_batch=1, max_delay_ms=1)
    stub = connect.stub(tiny_queue.port)
    sent = frames(media, ("cam-a", "cam-b"), 40)
    results = list(stub.InspectStream(iter(sent), timeout=120))
    verdicts = [r for r in results if r.WhichOneof("outcome") == "verdict"]
    drops = [r for r in results if r.WhichOneof("outcome") == "dropped"]
    assert len(sent) == len(verdicts) + len(drops) == len(results)
    assert drops and verdicts
    assert {d.dropped.reason for d in drops} == {pb.Drop.OVERLOADED}
    for cam in ("cam-a", "cam-b"):
        assert [r.frame_id for r in results if r.camera_id == cam] == list(range(40))
    # Unary callers see the same overload as a status; the others finish normally.
    calls = [stub.Inspect.future(pb.InspectRequest(image=media.image()), timeout=60) for _ in range(30)]
    codes = [c.code() for c in calls]
    assert Code.RESOURCE_EXHAUSTED in codes and Code.OK in codes
    assert set(codes) == {Code.OK, Code.RESOURCE_EXHAUSTED}
    assert "queue is full" in next(c.details() for c in calls if c.code() != Code.OK)


def test_metrics_endpoint_exports_batches_and_drops(server_factory, connect, media) -> None:
    running = server_factory(metrics_port=0)
    stub = connect.stub(running.port)
    stub.Inspect(pb.InspectRequest(image=media.image()), timeout=30)
    list(stub.InspectStream(iter([pb.Frame(camera_id="c", image=pb.Image(encoded=b""))]), timeout=30))
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "lineinspect_batch_size_count" in text
    assert 'lineinspect_frame_drops_total{reason="INVALID_IMAGE"} 1.0' in text
    assert 'lineinspect_requests_total{code="OK",method="Inspect"} 1.0' in text
    assert 'lineinspect_stage_seconds_count{stage="model"}' in text
    assert "lineinspect_queue_depth" in text


# ------------------------------------------------------------------------------ SIGTERM


SERVE_SCRIPT = (
    "import argparse, sys\n"
    "from lineinspect.service.commands import serve\n"
    "parser = argparse.ArgumentParser()\n"
    "serve.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def test_sigterm_drains_and_exits_zero(media) -> None:
    cmd = [sys.executable, "-c", SERVE_SCRIPT, "serve", "--untrained", "tiny", "--port", "0", "--grace", "5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()
    port = []

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("message") == "serving":
                port.append(entry["port"])
                ready.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(lines)
        channel = grpc.insecure_channel(f"127.0.0.1:{port[0]}")
        stub = pb_grpc.InspectionServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        feed = FrameFeed()
        stream = stub.InspectStream(iter(feed), timeout=60)
        for i in range(3):
            feed.send(pb.Frame(camera_id="cam", frame_id=i, image=media.image()))
        assert [next(stream).frame_id for _ in range(3)] == [0, 1, 2]
        for i in range(3, 6):  # in flight when the signal lands
            feed.send(pb.Frame(camera_id="cam", frame_id=i, image=media.image()))
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        feed.send(pb.Frame(camera_id="cam", frame_id=6, image=media.image()))  # after the signal
        feed.close()
        tail = list(stream)  # the stream ends normally once every frame is answered
        assert [r.frame_id for r in tail] == [3, 4, 5, 6]
        for r in tail:  # queued work finished; work arriving while draining is refused, never lost
            assert r.WhichOneof("outcome") == "verdict" or r.dropped.reason == pb.Drop.SHUTTING_DOWN
        assert proc.wait(timeout=30) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    messages = [json.loads(line).get("message") for line in lines if line.startswith("{")]
    assert "draining" in messages and "stopped" in messages


def test_jpeg_decode_setting_is_checked_and_gpu_decoding_needs_a_gpu() -> None:
    from lineinspect.service.config import ServerConfig
    from lineinspect.service.engine import device_jpeg_decoder

    with pytest.raises(LineInspectError, match="jpeg_decode must be auto, cpu or gpu"):
        ServerConfig(jpeg_decode="fpga")
    assert device_jpeg_decoder(ServerConfig(device="cpu")) is None  # auto on a CPU: OpenCV decodes
    assert device_jpeg_decoder(ServerConfig(device="cuda", jpeg_decode="cpu")) is None
    with pytest.raises(LineInspectError, match="needs a CUDA device"):
        device_jpeg_decoder(ServerConfig(device="cpu", jpeg_decode="gpu"))
