"""The dynamic batcher with a small real `process_batch` (image means), no server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from lineinspect.service.batcher import (
    Batcher,
    BatcherConfig,
    DeadlineExpired,
    Overloaded,
    Priority,
    ShuttingDown,
)
from lineinspect.service.metrics import ServiceMetrics


class MeanModel:
    """process_batch: the mean of each image; a negative image fails alone. `gate` holds the
    worker inside a batch so tests can pile up the queue deterministically."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay_s = delay_s

    def __call__(self, images: list[np.ndarray]) -> list[float | BaseException]:
        self.entered.set()
        self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        means = [float(image.mean()) for image in images]
        self.batches.append(means)
        return [ValueError(f"negative image {m}") if m < 0 else m for m in means]


def img(value: float) -> np.ndarray:
    return np.full((4, 4), value, np.float32)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def started(model: MeanModel, **config: Any) -> Batcher:
    batcher: Batcher = Batcher(model, BatcherConfig(**config), ServiceMetrics())
    await batcher.start()
    return batcher


async def hold_worker(batcher: Batcher, model: MeanModel) -> asyncio.Task:
    """Occupy the worker with one item so that later submits stay queued."""
    model.gate.clear()
    model.entered.clear()
    task = asyncio.create_task(batcher.submit(img(0.5)))
    while not model.entered.is_set():
        await asyncio.sleep(0.002)
    return task


def test_results_go_to_their_own_callers_in_batches() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=2, max_batch=4, max_delay_ms=20)
        done = await asyncio.gather(*(batcher.submit(img(i)) for i in range(10)))
        assert [d.value for d in done] == [float(i) for i in range(10)]
        assert all(1 <= len(b) <= 4 for b in model.batches)
        assert sum(len(b) for b in model.batches) == 10
        assert len(model.batches) < 10  # batched, not one by one
        assert all(d.batch_size == len(b) for d in done for b in model.batches if d.value in b)
        await batcher.stop()

    run(main())


def test_item_error_fails_only_that_item() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=3, max_batch=3, max_delay_ms=50)
        results = await asyncio.gather(
            batcher.submit(img(1)), batcher.submit(img(-1)), batcher.submit(img(3)), return_exceptions=True
        )
        assert results[0].value == 1.0 and results[2].value == 3.0
        assert isinstance(results[1], ValueError)
        assert len(model.batches) == 1  # one model call for the three
        await batcher.stop()

    run(main())


def test_process_batch_raising_fails_the_batch_but_not_the_batcher() -> None:
    calls = []

    def flaky(items: list[np.ndarray]) -> list[float]:
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [float(i.mean()) for i in items]

    async def main() -> None:
        batcher: Batcher = Batcher(flaky, BatcherConfig(min_batch=1, max_batch=8, max_delay_ms=0))
        await batcher.start()
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.submit(img(1))
        assert (await batcher.submit(img(2))).value == 2.0
        await batcher.stop()

    run(main())


def test_full_queue_raises_overloaded_at_once_and_wait_mode_waits() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=2, max_delay_ms=0, queue_capacity=3)
        holder = await hold_worker(batcher, model)
        queued = [asyncio.create_task(batcher.submit(img(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.depth(Priority.FAST) == 3
        t0 = time.perf_counter()
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.submit(img(9))
        assert time.perf_counter() - t0 < 0.05  # refused immediately, not after a wait
        waiter = asyncio.create_task(batcher.submit(img(7), wait=True))  # flow control instead
        await asyncio.sleep(0.02)
        assert not waiter.done()
        model.gate.set()
        assert (await waiter).value == 7.0
        assert [(await t).value for t in queued] == [0.0, 1.0, 2.0]
        await holder
        await batcher.stop()

    run(main())


def test_cancelled_request_frees_its_slot_and_is_never_processed() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=8, max_delay_ms=0, queue_capacity=2)
        holder = await hold_worker(batcher, model)
        doomed = asyncio.create_task(batcher.submit(img(42)))
        keeper = asyncio.create_task(batcher.submit(img(1)))
        await asyncio.sleep(0.01)
        assert batcher.depth() == 2
        doomed.cancel()
        await asyncio.sleep(0)
        assert batcher.depth() == 1  # the slot is free before the worker gets back
        extra = asyncio.create_task(batcher.submit(img(2)))  # would be Overloaded otherwise
        model.gate.set()
        assert (await keeper).value == 1.0 and (await extra).value == 2.0
        await holder
        assert 42.0 not in [m for b in model.batches for m in b]
        await batcher.stop()

    run(main())


def test_expired_deadline_is_dropped_before_the_model() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=8, max_delay_ms=0)
        holder = await hold_worker(batcher, model)
        loop = asyncio.get_running_loop()
        late = asyncio.create_task(batcher.submit(img(13), deadline=loop.time() + 0.02))
        await asyncio.sleep(0.05)
        model.gate.set()
        with pytest.raises(DeadlineExpired):
            await late
        await holder
        assert 13.0 not in [m for b in model.batches for m in b]
        with pytest.raises(DeadlineExpired):  # already past on arrival
            await batcher.submit(img(14), deadline=loop.time() - 1)
        await batcher.stop()

    run(main())


def test_fast_lane_goes_first_and_low_lane_rides_alone() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=3, max_delay_ms=0)
        holder = await hold_worker(batcher, model)
        low = [asyncio.create_task(batcher.submit(img(100 + i), priority=Priority.LOW)) for i in range(2)]
        await asyncio.sleep(0.01)
        fast = [asyncio.create_task(batcher.submit(img(i))) for i in range(2)]
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(holder, *low, *fast)
        assert model.batches[1] == [0.0, 1.0]  # fast items first; low items never join their batch
        assert model.batches[2:] == [[100.0], [101.0]]  # then one low item per call (low_max_batch 1)
        await batcher.stop()

    run(main())


def test_lone_item_waits_at_most_max_delay() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=4, max_batch=16, max_delay_ms=30)
        t0 = time.perf_counter()
        done = await batcher.submit(img(5))
        waited = time.perf_counter() - t0
        assert done.batch_size == 1
        assert 0.025 <= waited < 0.5  # held for company up to max_delay, then sent alone
        await batcher.stop()

    run(main())


def test_sparse_traffic_is_not_held_for_company() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=4, max_batch=16, max_delay_ms=200)
        waits = []
        for i in range(4):  # one client waiting for each reply: nobody else can arrive
            t0 = time.perf_counter()
            await batcher.submit(img(i))
            waits.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)  # the client handles the reply
        assert waits[0] >= 0.19  # no history yet: held up to max_delay
        assert max(waits[1:]) < 0.1, waits  # arrivals are max_delay apart: sent at once
        await batcher.stop()

    run(main())


def test_a_lone_client_answered_faster_than_max_delay_is_not_held_for_itself() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=4, max_batch=16, max_delay_ms=200)
        waits = []
        for i in range(16):  # replies come back well within max_delay, and the next item follows at once
            t0 = time.perf_counter()
            await batcher.submit(img(i))
            waits.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)
        assert max(waits[2:]) < 0.1, waits  # short gaps, but nothing else was in flight: no company
        await batcher.stop()

    run(main())


def test_batches_grow_under_load() -> None:
    async def main() -> None:
        model = MeanModel(delay_s=0.03)  # each model call takes 30 ms
        batcher = await started(model, min_batch=2, max_batch=32, max_delay_ms=2)

        targets = []

        async def client(k: int) -> None:
            for i in range(6):
                await batcher.submit(img(k * 10 + i))
                targets.append(batcher.target_batch())

        await asyncio.gather(*(client(k) for k in range(20)))  # 20 concurrent callers
        sizes = [len(b) for b in model.batches]
        assert max(sizes) >= 10, sizes  # callers pile up while the worker is busy
        assert sum(sizes) == 120
        assert max(targets) >= 10, targets  # the target followed the load
        await batcher.stop()

    run(main())


def test_prepare_runs_off_the_loop_and_its_error_frees_the_slot() -> None:
    def prepare(value: float) -> np.ndarray:
        if value < 0:
            raise ValueError("undecodable")
        assert threading.current_thread() is not threading.main_thread()
        return img(value)

    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=4, max_delay_ms=0, queue_capacity=1)
        assert (await batcher.submit(3.0, prepare=prepare)).value == 3.0
        with pytest.raises(ValueError, match="undecodable"):
            await batcher.submit(-1.0, prepare=prepare)
        assert batcher.depth() == 0
        assert (await batcher.submit(4.0, prepare=prepare)).value == 4.0
        await batcher.stop()

    run(main())


def test_drain_finishes_queued_work_and_refuses_new() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=2, max_delay_ms=0)
        holder = await hold_worker(batcher, model)
        queued = [asyncio.create_task(batcher.submit(img(i))) for i in range(5)]
        await asyncio.sleep(0.01)
        batcher.drain()
        with pytest.raises(ShuttingDown):
            await batcher.submit(img(9))
        model.gate.set()
        await batcher.stop(timeout=5)
        assert [(await t).value for t in queued] == [0.0, 1.0, 2.0, 3.0, 4.0]
        await holder

    run(main())


def test_stop_fails_what_is_left_after_the_grace_period() -> None:
    async def main() -> None:
        model = MeanModel()
        batcher = await started(model, min_batch=1, max_batch=1, max_delay_ms=0)
        holder = await hold_worker(batcher, model)
        stuck = asyncio.create_task(batcher.submit(img(1)))
        await asyncio.sleep(0.01)
        await batcher.stop(timeout=0.05)
        for task in (stuck, holder):  # queued and running items both get an answer
            with pytest.raises(ShuttingDown):
                await task
        model.gate.set()

    run(main())
