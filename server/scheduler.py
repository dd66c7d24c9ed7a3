"""Cross-session batching: one asyncio task per model turns queued steps into engine calls.

A batch closes when it holds ``max_batch`` sessions, when every live session of the model is in
it (nobody else can arrive), or ``max_wait_us`` after its first step. Steps of equal length T run
in one engine call; a batch with several lengths makes one call per length. Each session has at
most one step in flight (the session layer guarantees it), so its steps stay in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cellserve.server.engine import Engine
from cellserve.server.errors import ResourceExhausted, Unavailable
from cellserve.server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Request:
    slot: int
    x: np.ndarray  # [T] or [T, I]
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.perf_counter)


class Scheduler:
    """Batches steps from many sessions of one model into engine calls."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch: int,
        max_wait_us: int,
        max_queued: int,
        mode: str = "inline",
        live_sessions: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.model = engine.manifest.name
        self.max_batch = max_batch
        self.max_wait = max_wait_us / 1e6
        self.max_queued = max_queued
        self.mode = mode
        self._live_sessions = live_sessions or (lambda: max_batch)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.model}") if mode == "thread" else None
        m = metrics
        self._m_batch = m.batch_size.labels(model=self.model)
        self._m_wait = m.queue_wait.labels(model=self.model)
        self._m_engine = m.engine_run.labels(model=self.model)
        self._m_steps = m.steps.labels(model=self.model)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"scheduler-{self.model}")

    async def stop(self) -> None:
        """Stop batching; steps still queued fail with UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self._queue.empty():
            req = self._queue.get_nowait()
            if not req.future.done():
                req.future.set_exception(Unavailable("server is shutting down; resume on another replica"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, slot: int, x: np.ndarray) -> np.ndarray:
        """Queue one session's step (``x`` is [T] or [T, I]) and wait for its output [T, O]."""
        return await self.enqueue(slot, x)

    def enqueue(self, slot: int, x: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue one step; the future resolves to its output [T, O] once the engine is done with ``slot``."""
        if self._task is None:
            raise Unavailable(f"model {self.model!r} is not running; the server is starting or stopping")
        if self._queue.qsize() >= self.max_queued:
            raise ResourceExhausted(
                f"model {self.model!r} has {self.max_queued} steps queued (setting max_queued_steps); retry later"
            )
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(slot, x, future))
        self._arrived.set()
        return future

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run(batch)
            except Exception as e:  # an engine failure fails this batch, never the loop
                log.exception("engine call failed", extra={"model": self.model, "batch": len(batch)})
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)

    async def _collect(self) -> list[_Request]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while True:
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if len(batch) >= min(self.max_batch, self._live_sessions()):
                return batch
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def _run(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        batch = [r for r in batch if not r.future.done()]  # cancelled while queued
        for req in batch:
            self._m_wait.observe(start - req.queued_at)
        by_steps: dict[int, list[_Request]] = {}
        for req in batch:
            by_steps.setdefault(req.x.shape[0], []).append(req)
        for group in by_steps.values():
            slots = np.fromiter((r.slot for r in group), dtype=np.int64, count=len(group))
            x = np.stack([r.x for r in group])  # [B, T] or [B, T, I]
            t0 = time.perf_counter()
            if self._executor is None:
                y = self.engine.run_slots(slots, x)
            else:
                y = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.run_slots, slots, x)
            self._m_engine.observe(time.perf_counter() - t0)
            self._m_batch.observe(len(group))
            self._m_steps.inc(len(group) * x.shape[1])
            for i, req in enumerate(group):
                if not req.future.done():
                    req.future.set_result(y[i])
