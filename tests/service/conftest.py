"""Fixtures for the gRPC service tests: real servers on free 127.0.0.1 ports, driven from the
test thread with real (blocking) stubs.

All grpc.aio servers of the session run on one event loop in a background thread, the way a
server process runs them; the tests talk to them over TCP like any client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import cv2
import grpc
import numpy as np
import pytest

from lineinspect.service.config import ServerConfig
from lineinspect.service.server import RunningServer, start_server
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.v1 import inspection_pb2_grpc as pb_grpc

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running forever in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-aio-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def aio_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def tiny_inspector():
    """The real fast path with random weights (contract tests need shapes, not accuracy)."""
    from lineinspect.vision.model_io import untrained_inspector

    inspector = untrained_inspector("tiny")
    inspector.inspect_batch([np.zeros((32, 32, 3), np.uint8)])  # pay the lazy init once
    return inspector


ServerFactory = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def server_factory(aio_loop: LoopThread, tiny_inspector) -> Iterator[ServerFactory]:
    """`server_factory(inspector=None, warmup=False, **config_overrides)` starts a real server on a
    free port; all are stopped when the module ends."""
    started: list[RunningServer] = []

    def make(inspector=None, warmup: bool = False, **overrides: Any) -> RunningServer:
        config = ServerConfig(port=0, grace_s=2.0, **overrides)
        running = aio_loop.run(start_server(config, inspector or tiny_inspector, warmup=warmup))
        started.append(running)
        return running

    yield make
    for running in started:
        aio_loop.run(running.stop(0.5))


@pytest.fixture(scope="module")
def server(server_factory: ServerFactory) -> RunningServer:
    """One default server shared by a test module."""
    return server_factory()


class Connector:
    """Opens channels to test servers and closes them all at teardown."""

    def __init__(self) -> None:
        self.channels: list[grpc.Channel] = []

    def channel(self, port: int, credentials: grpc.ChannelCredentials | None = None, **kwargs: Any) -> grpc.Channel:
        target = f"localhost:{port}" if credentials is not None else f"127.0.0.1:{port}"
        channel = (grpc.secure_channel(target, credentials, **kwargs) if credentials is not None
                   else grpc.insecure_channel(target, **kwargs))
        self.channels.append(channel)
        return channel

    def stub(self, port: int, credentials: grpc.ChannelCredentials | None = None,
             **kwargs: Any) -> pb_grpc.InspectionServiceStub:
        return pb_grpc.InspectionServiceStub(self.channel(port, credentials, **kwargs))

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@pytest.fixture()
def connect() -> Iterator[Connector]:
    connector = Connector()
    yield connector
    connector.close()


@pytest.fixture()
def stub(server: RunningServer, connect: Connector) -> pb_grpc.InspectionServiceStub:
    return connect.stub(server.port)


class Media:
    """Small test images and their encodings."""

    @staticmethod
    def sample(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
        """RGB uint8 (height, width, 3) with some structure."""
        rng = np.random.default_rng(seed)
        image = np.full((height, width, 3), 120, np.uint8)
        image[:, : width // 2] = 60
        return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)

    @staticmethod
    def png(image: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
        assert ok
        return buf.tobytes()

    @staticmethod
    def jpeg(image: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]))
        assert ok
        return buf.tobytes()

    def image(self, seed: int = 0, height: int = 48, width: int = 64) -> pb.Image:
        return pb.Image(encoded=self.png(self.sample(height, width, seed)))


@pytest.fixture(scope="session")
def media() -> Media:
    return Media()
