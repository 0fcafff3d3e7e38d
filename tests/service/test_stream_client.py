"""Camera ingest: mailbox and backoff in isolation, then the client against a real server on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineinspect.errors import LineInspectError
from lineinspect.service.commands import stream as stream_command
from lineinspect.service.config import ServerConfig
from lineinspect.service.frames import SourceLost, open_source
from lineinspect.service.server import RunningServer, start_server
from lineinspect.service.stream_client import Backoff, Mailbox, MailboxClosed, StreamClient, StreamConfig

# ---------------------------------------------------------------------------------------------
# Mailbox: the newest frame wins


def test_mailbox_newest_wins_and_counts_replaced() -> None:
    box: Mailbox[int] = Mailbox()
    assert box.put(1) is False
    assert box.put(2) is True
    assert box.put(3) is True
    assert box.get(timeout=0) == 3 and box.dropped == 2
    assert box.get(timeout=0) is None  # empty: times out

    box.put(4)
    taken = box.get(timeout=0)
    box.put(5)  # newer frame arrives while 4 is out of the box ...
    box.restore(taken)  # ... so 4 cannot come back: it is a drop
    assert box.get(timeout=0) == 5 and box.dropped == 3
    box.restore(6)  # nothing newer: it goes back in
    assert box.get(timeout=0) == 6 and box.dropped == 3

    box.put(7)
    box.close()
    assert not box.exhausted
    assert box.get(timeout=0) == 7  # a waiting item is still handed out after close
    assert box.exhausted
    with pytest.raises(MailboxClosed):
        box.get(timeout=0)
    box.put(8)  # after close: counted as dropped, never delivered
    assert box.dropped == 4


def test_mailbox_wakes_a_waiting_consumer() -> None:
    box: Mailbox[str] = Mailbox()
    got: list[str] = []
    consumer = threading.Thread(target=lambda: got.append(box.get(timeout=5)))
    consumer.start()
    box.put("frame")
    consumer.join(5)
    assert got == ["frame"]


def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    b = Backoff(initial=0.1, maximum=1.0, factor=2.0, jitter=0.25, rng=random.Random(3))
    delays = [b.next_delay() for _ in range(8)]
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for d, base in zip(delays, bases, strict=True):
        assert 0.75 * base - 1e-9 <= d <= base
    assert len(set(delays[4:])) > 1  # jitter: capped delays still differ
    b.reset()
    assert b.next_delay() <= 0.1
    with pytest.raises(LineInspectError):
        Backoff(initial=2.0, maximum=1.0)


# ---------------------------------------------------------------------------------------------
# Sources


def write_frames(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"frame_{i:04d}.png"), image)
    return folder


def test_sources_read_folders_and_videos_and_explain_bad_ones(tmp_path: Path) -> None:
    folder = write_frames(tmp_path / "frames", 3)
    _, src = open_source(str(folder))
    assert [src.read().shape for _ in range(3)] == [(60, 80, 3)] * 3 and src.read() is None
    _, src = open_source(str(folder), loop=True)
    assert all(src.read() is not None for _ in range(7))

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 12.0, (80, 60))
    for i in range(5):
        writer.write(np.full((60, 80, 3), 40 * i, np.uint8))
    writer.release()
    spec, src = open_source(str(video))
    assert not spec.live and src.fps == pytest.approx(12.0)
    frames = [src.read() for _ in range(6)]
    assert all(f is not None and f.shape == (60, 80, 3) for f in frames[:5]) and frames[5] is None

    with pytest.raises(LineInspectError, match="no such file or folder"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LineInspectError, match="no images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(LineInspectError, match="cannot read this file as a video"):
        open_source(str(tmp_path / "notes.mp4"))
    with pytest.raises(LineInspectError, match="not a stream"):
        open_source(str(folder / "frame_0000.png"))


class FlakyCamera:
    """A live source that delivers `n` frames, then loses its connection (or ends, if `last`)."""

    live = True
    fps = None
    name = "flaky"

    def __init__(self, n: int, last: bool) -> None:
        self.left, self.last = n, last

    def read(self) -> np.ndarray | None:
        if self.left == 0:
            if self.last:
                return None
            raise SourceLost("flaky: cable pulled")
        self.left -= 1
        return np.zeros((8, 8, 3), np.uint8)

    def close(self) -> None:
        pass


class FlakySpec:
    """Reopening fails once (camera still rebooting), then gives a camera that ends after 4 frames."""

    live = True

    def __init__(self) -> None:
        self.opens = 0

    def open(self) -> FlakyCamera:
        self.opens += 1
        if self.opens == 1:
            raise SourceLost("flaky: still rebooting")
        return FlakyCamera(4, last=True)


def test_capture_reopens_a_lost_camera_and_keeps_counting() -> None:
    config = StreamConfig("0", "127.0.0.1:1", "cam-f", backoff_initial_s=0.01, backoff_max_s=0.02)
    logs: list[str] = []
    client = StreamClient(config, emit=lambda e: None, log=logs.append)
    spec = FlakySpec()
    client._capture(spec, FlakyCamera(3, last=False), None)  # returns when the camera ends
    assert spec.opens == 2 and client.stats.camera_reconnects == 1
    assert client.stats.captured == 7
    assert client.mailbox.get(timeout=0).frame_id == 6  # the newest frame; ids run on across the gap
    assert client.mailbox.dropped == 6 and client.mailbox.exhausted
    assert any("cable pulled" in m for m in logs) and any("still rebooting" in m for m in logs)


# ---------------------------------------------------------------------------------------------
# Against a real server


class Restartable:
    """A real gRPC server on 127.0.0.1 (on the conftest's asyncio loop) that can be stopped and
    started again on the same port."""

    def __init__(self, aio_loop, inspector) -> None:
        self.aio_loop = aio_loop
        self.inspector = inspector
        self.running: RunningServer | None = None

    def start(self, port: int = 0, **overrides) -> int:
        settings = {"min_batch": 1, "max_batch": 8, "max_delay_ms": 2.0, "grace_s": 0.0, **overrides}
        config = ServerConfig(port=port, **settings)
        self.running = self.aio_loop.run(start_server(config, self.inspector, warmup=False))
        return self.running.port

    def stop(self) -> None:
        if self.running is not None:
            self.aio_loop.run(self.running.stop(0.0))
            self.running = None


@pytest.fixture()
def restartable(aio_loop, tiny_inspector) -> Iterator[Restartable]:
    server = Restartable(aio_loop, tiny_inspector)
    yield server
    server.stop()


@pytest.fixture()
def live_server(restartable: Restartable) -> Restartable:
    restartable.start()
    return restartable


def check_counts(summary: dict) -> None:
    assert summary["captured"] == summary["sent"] + summary["client_drops"]
    assert summary["sent"] == summary["verdicts"] + summary["server_drops"] + summary["lost_in_flight"]


def test_stream_cli_prints_a_line_per_frame_and_a_consistent_summary(tmp_path: Path, live_server,
                                                                       capsys) -> None:
    frames = write_frames(tmp_path / "frames", 16)
    parser = argparse.ArgumentParser()
    stream_command.register(parser.add_subparsers())
    args = parser.parse_args([
        "stream", "--source", str(frames), "--server", f"127.0.0.1:{live_server.running.port}",
        "--camera-id", "line-3", "--fps", "40", "--jpeg-quality", "80",
        "--annotate", str(tmp_path / "annotated.mp4"), "--heatmaps",
    ])
    assert args.func(args) == 0

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    *results, summary = lines
    assert summary["event"] == "summary" and summary["camera_id"] == "line-3"
    check_counts(summary)
    assert summary["captured"] == 16 and summary["lost_in_flight"] == 0
    assert summary["sent"] == summary["verdicts"] + summary["server_drops"] == len(results) >= 1
    ids = [r["frame_id"] for r in results]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)  # one reply per sent frame, in order
    for r in results:
        assert r["camera_id"] == "line-3"
        if r["event"] == "verdict":
            assert r["verdict"] in ("good", "defect") and 0.0 <= r["score"] <= 1.0
            assert r["latency_ms"] > 0 and r["server_timings_ms"]["model_ms"] > 0
            assert isinstance(r["boxes"], list)
        else:
            assert r["event"] == "dropped" and r["reason"]
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]

    video = cv2.VideoCapture(str(tmp_path / "annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == len(results)
    ok, first = video.read()
    assert ok and first.shape[1] == 80 and first.shape[0] > 60  # the frame plus the verdict bar


def test_stream_reconnects_when_the_server_restarts(tmp_path: Path, live_server) -> None:
    frames = write_frames(tmp_path / "frames", 10)
    server = live_server
    port = server.running.port
    events: list[dict] = []
    first_verdicts = threading.Event()
    restarted = threading.Event()

    def emit(event: dict) -> None:
        events.append(event)
        if sum(e["event"] == "verdict" for e in events) == 8:
            first_verdicts.set()

    def restart() -> None:
        first_verdicts.wait(30)
        server.stop()
        time.sleep(0.3)  # the client sees a dead server and backs off meanwhile
        server.start(port)  # same port: a restarted server, not a new address
        restarted.set()

    config = StreamConfig(str(frames), f"127.0.0.1:{port}", "cam-r", fps=25.0, max_frames=90, loop=True,
                          backoff_initial_s=0.05, backoff_max_s=0.2, connect_timeout_s=0.5)
    client = StreamClient(config, emit=emit, log=lambda m: None, rng=random.Random(0))
    helper = threading.Thread(target=restart)
    helper.start()
    summary = client.run()
    helper.join(30)

    assert restarted.is_set()
    check_counts(summary)
    assert summary["captured"] == 90
    assert summary["server_reconnects"] >= 1
    verdict_ids = [e["frame_id"] for e in events if e["event"] == "verdict"]
    after = [i for i in verdict_ids if i > verdict_ids[7]]
    assert len(after) >= 10, "the client must keep streaming to the restarted server"
    answered = [e["frame_id"] for e in events if e["event"] in ("verdict", "dropped")]
    assert len(answered) == len(set(answered))  # frame ids keep counting across the reconnect
    assert summary["sent"] - summary["lost_in_flight"] == len(answered)


def test_stream_without_a_server_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    frames = write_frames(tmp_path / "frames", 2)
    config = StreamConfig(str(frames), "127.0.0.1:9", "cam-x", backoff_initial_s=0.05, backoff_max_s=0.1,
                          connect_timeout_s=0.2, give_up_after_s=0.5, loop=True, fps=20.0)
    with pytest.raises(LineInspectError, match="no connection"):
        StreamClient(config, log=lambda m: None).run()


def test_server_drops_are_counted_apart_from_verdicts(tmp_path: Path, restartable: Restartable) -> None:
    frames = write_frames(tmp_path / "frames", 6)
    # A frame deadline of 1 us: the server must drop every frame, and say so frame by frame.
    port = restartable.start(frame_timeout_ms=0.001)
    events: list[dict] = []
    config = StreamConfig(str(frames), f"127.0.0.1:{port}", "cam-d", fps=30.0)
    summary = StreamClient(config, emit=events.append, log=lambda m: None).run()
    check_counts(summary)
    drops = [e for e in events if e["event"] == "dropped"]
    assert summary["server_drops"] == len(drops) == summary["sent"] >= 1 and summary["verdicts"] == 0
    assert summary["drop_reasons"] == {"DEADLINE_EXCEEDED": len(drops)}
    assert all(d["detail"] for d in drops)


def test_stream_with_a_token_server(tmp_path: Path, restartable: Restartable) -> None:
    frames = write_frames(tmp_path / "frames", 3)
    (tmp_path / "server.tokens").write_text("# rotated weekly\nsecret-1\n")
    (tmp_path / "client.token").write_text("secret-1\n")
    (tmp_path / "wrong.token").write_text("guess\n")
    address = f"127.0.0.1:{restartable.start(auth_token_file=tmp_path / 'server.tokens')}"
    with pytest.raises(LineInspectError, match="UNAUTHENTICATED.*--token-file"):
        StreamClient(StreamConfig(str(frames), address, "cam-t", token_file=tmp_path / "wrong.token"),
                     emit=lambda e: None, log=lambda m: None).run()
    config = StreamConfig(str(frames), address, "cam-t", fps=30.0, token_file=tmp_path / "client.token")
    summary = StreamClient(config, emit=lambda e: None).run()
    assert summary["sent"] == summary["verdicts"] >= 1
