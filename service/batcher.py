"""Dynamic batcher: an asyncio front end that gathers requests into batches for one blocking
worker thread.

Policy
------
* Lanes. Every item goes into one of three bounded lanes, served in priority order: FAST
  (camera frames, unary calls), BULK (audit jobs), LOW (language work). A batch takes FAST
  items first and fills the remaining slots from BULK, so fast-path work never waits behind
  slower lanes. LOW items never share a batch with FAST or BULK ones (each extra image makes a
  CPU batch longer, and a camera frame would pay for it) and run in batches of at most
  `low_max_batch`, so a frame arriving meanwhile waits for one short call at most. (A lower
  lane can starve while the fast lane stays full; that is the intended trade.)
* Capacity. Each lane holds at most `queue_capacity` items, counted from admission (before the
  optional `prepare` step, e.g. decoding) until the item is taken into a batch. `submit` on a
  full lane raises `Overloaded` at once (never blocks the event loop), or with `wait=True`
  waits for space (flow control for batch jobs).
* Adaptive size. The target batch size is the number of items expected to arrive during one
  model call, `ceil(arrival_rate * batch_time)`, clamped to [min_batch, max_batch]; both
  rates are moving averages. When the worker is free it takes whatever is queued (up to
  max_batch) at once if that reaches the target; otherwise it waits for more, but never
  longer than `max_delay_ms` after the oldest queued item arrived, and only while company
  is likely: most recent arrivals came within max_delay of the one before while other work was
  in flight (a moving average; with no history yet, company is assumed). So a lone camera, or
  one client waiting for each reply, is served at once instead of waiting max_delay for items
  that will not come - even when its replies come back faster than max_delay; bursts
  and busy traffic wait at most max_delay; and under heavy load batches grow towards
  max_batch with no added delay (items queue up while the previous batch runs).
* One worker thread runs `process_batch(items) -> results` once per batch. A result that is an
  exception fails only its own item; `process_batch` raising fails the whole batch.
* Cancellation. A cancelled `submit` removes its item from the queue (its slot is free at
  once); an item whose batch is already running finishes and its result is dropped.
* Deadlines. An item whose deadline (event-loop time) passed before its batch started is
  failed with `DeadlineExpired` and never reaches the model.
* Shutdown. `drain()` refuses new items (`ShuttingDown`) and dispatches queued ones without
  waiting; `stop()` waits for the queue to empty, then fails what is left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

from lineinspect.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Priority(IntEnum):
    FAST = 0  # camera frames and unary inspections
    BULK = 1  # audit jobs
    LOW = 2  # language path


class BatcherError(Exception):
    """Base of the batcher's refusals; each maps to one gRPC status / Drop reason."""


class Overloaded(BatcherError):
    """The lane is full; the item was not queued."""


class ShuttingDown(BatcherError):
    """The batcher is draining and takes no new items."""


class DeadlineExpired(BatcherError):
    """The item's deadline passed before its batch started."""


@dataclass(frozen=True)
class BatcherConfig:
    min_batch: int = 4
    max_batch: int = 64
    max_delay_ms: float = 5.0
    queue_capacity: int = 256  # per lane
    low_max_batch: int = 1  # LOW-lane (language) images per model call; they never join fast batches

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= max_batch, got {self.min_batch}, {self.max_batch}")
        if self.max_delay_ms < 0 or self.queue_capacity < 1 or self.low_max_batch < 1:
            raise ValueError("need max_delay_ms >= 0, queue_capacity >= 1 and low_max_batch >= 1")


@dataclass(frozen=True)
class Done(Generic[R]):
    """A processed item: its result and where its time went."""

    value: R
    queued_s: float  # from entering the queue (after `prepare`) to the start of its batch
    prepare_s: float
    run_s: float  # the whole batch's `process_batch` call
    batch_size: int


@dataclass(eq=False)
class _Request:
    item: Any
    lane: Priority
    future: asyncio.Future
    deadline: float | None
    enqueued: float = 0.0  # loop time when it entered its lane
    prepare_s: float = 0.0
    counted: bool = True  # holds a slot of its lane


@dataclass
class _Ewma:
    alpha: float
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value


@dataclass
class _LoadEstimate:
    window: float = 0.0  # max_delay, seconds: how soon a next arrival counts as company
    gap: _Ewma = field(default_factory=lambda: _Ewma(0.05))  # seconds between arrivals
    batch_time: _Ewma = field(default_factory=lambda: _Ewma(0.2))  # seconds per model call
    company: _Ewma = field(default_factory=lambda: _Ewma(0.1))  # share of gaps <= window
    last_arrival: float | None = None

    def arrival(self, now: float, others_in_flight: bool) -> None:
        """An item arrived at `now`; `others_in_flight`: other items were queued or running then.
        A client that waits for each reply sends its next item only when nothing of its own is
        in flight, so a short gap alone is no sign of company (a lone camera answered in 4 ms
        would otherwise wait up to max_delay for itself on every other frame)."""
        if self.last_arrival is not None:
            gap = now - self.last_arrival
            self.gap.add(gap)
            self.company.add(1.0 if gap <= self.window and others_in_flight else 0.0)
        self.last_arrival = now

    def company_likely(self) -> bool:
        """Whether a queued item is likely to be joined within `window`; True with no history."""
        return self.company.value is None or self.company.value >= 0.5

    def expected_per_batch(self, now: float) -> float:
        if self.gap.value is None or self.batch_time.value is None or self.last_arrival is None:
            return 0.0
        # An idle spell counts as a long gap, so the rate decays when traffic stops.
        gap = max(self.gap.value, now - self.last_arrival, 1e-6)
        return self.batch_time.value / gap


class Batcher(Generic[T, R]):
    """Gathers `submit`ted items into batches for `process_batch`, run in one worker thread."""

    def __init__(
        self,
        process_batch: Callable[[list[T]], Sequence[R | BaseException]],
        config: BatcherConfig | None = None,
        metrics: ServiceMetrics | None = None,
        name: str = "batcher",
        prepare_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """`prepare_executor` runs `submit(prepare=...)` steps; without one the batcher makes
        (and owns) a two-thread pool."""
        self.config = config or BatcherConfig()
        self._process = process_batch
        self._metrics = metrics
        self._name = name
        self._lanes: dict[Priority, deque[_Request]] = {p: deque() for p in Priority}
        self._waiting: dict[Priority, int] = dict.fromkeys(Priority, 0)  # admitted, not yet taken
        self._space: dict[Priority, list[asyncio.Future]] = {p: [] for p in Priority}
        self._load = _LoadEstimate(window=self.config.max_delay_ms / 1000)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._prepare_pool = prepare_executor
        self._owns_prepare_pool = prepare_executor is None
        self._closing = False
        self._running: list[_Request] = []  # the batch in the worker now
        self.batches_run = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the collector task on the running loop."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{self._name}-worker")
        if self._prepare_pool is None:
            self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix=f"{self._name}-prepare")
        self._task = asyncio.create_task(self._collect(), name=f"{self._name}-collector")

    async def run_on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the thread that runs the batches (model warm-up: one thread owns the model's
        CPU threads, `vision.cpu_threads`)."""
        if self._worker is None:
            raise RuntimeError("batcher not started")
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def drain(self) -> None:
        """Refuse new items from now on; queued items are dispatched without delay."""
        self._closing = True
        self._wake()
        for lane in Priority:
            self._wake_space(lane)

    async def stop(self, timeout: float = 10.0) -> None:
        """Drain, wait up to `timeout` s for queued items to finish, then fail the rest."""
        self.drain()
        left: list[_Request] = []
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.warning("batcher stop: queue not empty after grace period", extra={"batcher": self._name})
                left.extend(self._running)  # the worker may finish them, but nobody will wait
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        for lane in Priority:
            while self._lanes[lane]:
                request = self._lanes[lane].popleft()
                self._release(request)
                left.append(request)
        for request in left:
            if not request.future.done():
                request.future.set_exception(ShuttingDown("server shut down before this item was done"))
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
        if self._owns_prepare_pool and self._prepare_pool is not None:
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def closing(self) -> bool:
        return self._closing

    def depth(self, lane: Priority | None = None) -> int:
        """Items admitted and not yet taken into a batch (one lane, or all)."""
        return self._waiting[lane] if lane is not None else sum(self._waiting.values())

    def target_batch(self) -> int:
        """The current adaptive target batch size."""
        expected = self._load.expected_per_batch(time.monotonic())
        return max(self.config.min_batch, min(self.config.max_batch, math.ceil(expected)))

    # ---------------------------------------------------------------- submit

    async def submit(
        self,
        item: Any,
        *,
        priority: Priority = Priority.FAST,
        deadline: float | None = None,
        prepare: Callable[[Any], T] | None = None,
        wait: bool = False,
    ) -> Done[R]:
        """Queue `item` (after `prepare(item)` in a thread, if given) and await its result.

        `deadline` is in event-loop time (`loop.time()`). Raises Overloaded (lane full and not
        `wait`), ShuttingDown, DeadlineExpired, whatever `prepare` raised, or the item's own
        error from `process_batch`.
        """
        if self._task is None or self._wakeup is None:
            raise RuntimeError("batcher not started")
        loop = asyncio.get_running_loop()
        await self._admit(priority, wait)
        request = _Request(item, priority, loop.create_future(), deadline)
        self._load.arrival(time.monotonic(), others_in_flight=self.depth() > 1 or bool(self._running))
        try:
            if prepare is not None:
                t0 = time.perf_counter()
                assert self._prepare_pool is not None
                request.item = await loop.run_in_executor(self._prepare_pool, prepare, item)
                request.prepare_s = time.perf_counter() - t0
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineExpired("deadline passed before the item was queued")
            request.enqueued = loop.time()
            self._lanes[priority].append(request)
            self._wake()
            return await request.future
        except asyncio.CancelledError:
            self._remove(request)
            raise
        finally:
            self._release(request)

    async def _admit(self, lane: Priority, wait: bool) -> None:
        while True:
            if self._closing:
                raise ShuttingDown("server is shutting down; no new work accepted")
            if self._waiting[lane] < self.config.queue_capacity:
                break
            if not wait:
                raise Overloaded(
                    f"server queue is full ({self.config.queue_capacity} items waiting); retry later"
                )
            space = asyncio.get_running_loop().create_future()
            self._space[lane].append(space)
            try:
                await space
            finally:
                if space in self._space[lane]:
                    self._space[lane].remove(space)
        self._waiting[lane] += 1
        self._gauge(lane)

    def _release(self, request: _Request) -> None:
        if request.counted:
            request.counted = False
            self._waiting[request.lane] -= 1
            self._gauge(request.lane)
            self._wake_space(request.lane)
            if self._closing:
                self._wake()  # the collector exits once nothing is left

    def _remove(self, request: _Request) -> None:
        try:
            self._lanes[request.lane].remove(request)
        except ValueError:
            return  # not queued (still preparing, or already taken into a batch)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _wake_space(self, lane: Priority) -> None:
        # Wake every waiter; each re-checks the lane, so a cancelled waiter loses no wake-up.
        for space in self._space[lane]:
            if not space.done():
                space.set_result(None)

    def _gauge(self, lane: Priority) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(lane.name.lower()).set(self._waiting[lane])

    # ---------------------------------------------------------------- collector

    def _queued(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def _oldest(self) -> float:
        return min(q[0].enqueued for q in self._lanes.values() if q)

    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        max_delay = self.config.max_delay_ms / 1000
        while True:
            while not self._queued():
                if self._closing and self.depth() == 0:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Gather: dispatch now if the target is reached or no company is likely, else wait
            # for more up to max_delay.
            while not self._closing and 0 < self._queued() < self.target_batch():
                remaining = self._oldest() + max_delay - loop.time()
                if remaining <= 0 or not self._load.company_likely():
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(loop.time())
            if batch:
                await self._run(batch)

    def _take(self, now: float) -> list[_Request]:
        batch: list[_Request] = []
        for lane in Priority:
            if lane is Priority.LOW and batch:
                break  # language work rides alone, never in a fast batch
            queue = self._lanes[lane]
            limit = self.config.low_max_batch if lane is Priority.LOW else self.config.max_batch
            while queue and len(batch) < limit:
                request = queue.popleft()
                self._release(request)
                if request.future.done():
                    continue
                if request.deadline is not None and now >= request.deadline:
                    request.future.set_exception(DeadlineExpired("deadline passed while queued"))
                    continue
                batch.append(request)
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        items = [r.item for r in batch]
        t0 = time.perf_counter()
        self._running = batch
        try:
            results: Sequence[Any] = await loop.run_in_executor(self._worker, self._call, items)
            error: BaseException | None = None
        except Exception as exc:  # process_batch itself failed: the whole batch fails
            log.exception("batch failed", extra={"batcher": self._name, "batch_size": len(batch)})
            results, error = [], exc
        finally:
            self._running = []
        run_s = time.perf_counter() - t0
        self._load.batch_time.add(run_s)
        self.batches_run += 1
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
        for i, request in enumerate(batch):
            if request.future.done():  # cancelled while its batch ran
                continue
            value = error if error is not None else results[i]
            if isinstance(value, BaseException):
                request.future.set_exception(value)
            else:
                queued_s = started - request.enqueued
                request.future.set_result(Done(value, queued_s, request.prepare_s, run_s, len(batch)))

    def _call(self, items: list[Any]) -> Sequence[Any]:
        results = self._process(items)
        if len(results) != len(items):
            raise RuntimeError(f"process_batch returned {len(results)} results for {len(items)} items")
        return results
