"""Cross-session batching: each model's scheduler turns queued steps into engine calls.

A batch closes when it holds ``max_batch`` steps, when every live session of the model is in it (nobody
else can arrive), or ``max_wait_us`` after its first step. Steps of equal shape (length T, and frame dims
where the model leaves them dynamic) run in one engine call, at most ``max_batch_steps`` rows x steps per
call (more run as further calls: the engine's memory is bounded); a batch with several shapes makes one call
per shape. Each session has at most one step in flight (the session layer sees to it): its steps stay in order.

A gateway's message of many sessions' steps (``enqueue_many``) is one queue entry with one future; its rows
count towards ``max_batch``, share engine calls with other steps, and are answered together (``GroupResult``).

Per message the cost is an append and a comparison: ``enqueue`` itself decides when a batch is
due. Inline (the default), the step that completes a batch runs it right there, or a timer does
``max_wait_us`` after the oldest step: no task and no extra turn of the event loop. With
``engine_mode=thread`` a task runs due batches in a worker thread. Everything else — metrics
included — is done once per batch.

A failed engine call fails only steps that were in it. Its group is retried in halves until the failing
steps stand alone (at most 2(n-1) more calls for a group of n, O(k log n) for k bad steps); the others
complete. A failed call leaves its slots' state as it was (``Engine.run_slots``), so each failing step is
answered ``StepFailed`` (``StepOutOfMemory`` when memory ran out) and its session may step again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from cellserve.server.batching import (
    Entry,
    Finished,
    FinishedMany,
    Group,
    GroupResult,
    Request,
    Unit,
    alone,
    describe_error,
    inputs,
    pack,
    rows_of,
    step_failed,
)
from cellserve.server.engine import Engine
from cellserve.server.errors import ResourceExhausted, StepOutOfMemory, Unavailable
from cellserve.server.logs import session_log_fields
from cellserve.server.metrics import Metrics

if TYPE_CHECKING:
    from cellserve.server.tracing import Owner, StepTracer

log = logging.getLogger(__name__)

Ran = tuple[list[Unit], np.ndarray, float]  # steps of one engine call that succeeded, their y, its seconds
Isolated = tuple[list[Ran], list[tuple[Unit, Exception]]]  # after a failed call: what ran, what failed alone


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
        max_batch_steps: int = 1 << 62,
        live_sessions: Callable[[], int] | None = None,
        tracer: StepTracer | None = None,
    ) -> None:
        """``tracer``: step and batch spans (tracing on); None costs one check per engine call."""
        self.engine = engine
        self.model = engine.manifest.name
        self.max_batch = max_batch
        self.max_wait = max_wait_us / 1e6
        self.max_queued = max_queued
        self.max_batch_steps = max_batch_steps
        self.mode = mode
        self._live_sessions = live_sessions or (lambda: max_batch)
        self._queue: deque[Entry] = deque()
        self._queued_rows = 0  # sessions' steps in the queue (a group counts its rows)
        self._timer: asyncio.TimerHandle | None = None  # fires max_wait_us after the oldest queued step
        self._waited = False  # the oldest queued step has waited max_wait_us
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        # engine_mode=thread: a task waits for due batches (on _wake) and runs them in a worker thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.model}") if mode == "thread" else None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._in_flight: list[Entry] = []  # thread mode: the batch the engine thread is running
        self._m_batch = metrics.batch_size.labels(model=self.model)
        self._m_wait = metrics.queue_wait.labels(self.model)
        self._m_latency = metrics.step_latency.labels(self.model)
        self._m_engine = metrics.engine_run.labels(model=self.model)
        self._m_steps = metrics.steps.labels(model=self.model)
        self._m_session_steps = metrics.session_steps.labels(model=self.model)
        self._m_messages = metrics.step_messages.labels(model=self.model)
        self._m_failures = metrics.engine_failures
        self._tracer = tracer

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        if self._executor is not None:
            self._task = self._loop.create_task(self._run_threaded_forever(), name=f"scheduler-{self.model}")

    async def stop(self) -> None:
        """Stop batching; steps still queued fail with UNAVAILABLE. A batch the engine thread is running
        finishes first (its slots are written until then)."""
        self._running = False
        if self._task is not None:
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
            await self._task
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stopping = Unavailable("server is shutting down; resume on another replica")
        for req in [*self._in_flight, *self._queue]:
            req.fail(stopping)
        self._in_flight, self._queue, self._queued_rows = [], deque(), 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def enqueue(
        self, slot: int, x: np.ndarray, finished: Finished, owner: Owner | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue one step; the future resolves to its output [T, O]. ``finished(steps)`` is called exactly
        once, when the engine is done with ``slot`` (or the step was dropped: cancelled while queued).
        ``owner``: the session it is a step of (its trace, its id in logs).

        Inline, the step that completes a batch runs it before returning: its own future is then already
        done, so its caller resumes without waiting a turn of the event loop.
        """
        future: asyncio.Future[np.ndarray] = self._admit(1).create_future()
        self._queue.append(Request(slot, x, future, finished, owner))
        self._queued_rows += 1
        self._queued()
        return future

    def enqueue_many(
        self, slots: np.ndarray, x: np.ndarray, finished: FinishedMany, owners: Sequence[Owner | None]
    ) -> asyncio.Future[GroupResult]:
        """Queue one step for each of many sessions: row i of ``x`` ([n, T, *frame]) for slot ``slots[i]``, at most
        ``max_batch`` rows and ``max_batch_steps`` rows x steps (the caller splits larger messages). One future
        resolves to a :class:`GroupResult`; ``finished(steps, failed)`` is called once, when the engine is done
        with every slot. ``owners[i]``: row i's session (its trace, its id in logs)."""
        rows = len(slots)
        assert 0 < rows <= self.max_batch and rows * x.shape[1] <= max(self.max_batch_steps, x.shape[1])
        future: asyncio.Future[GroupResult] = self._admit(rows).create_future()
        self._queue.append(Group(slots, x, future, finished, owners))
        self._queued_rows += rows
        self._queued()
        return future

    def _admit(self, rows: int) -> asyncio.AbstractEventLoop:
        """The loop to make the future on, if ``rows`` more steps may queue (else UNAVAILABLE or RESOURCE_EXHAUSTED)."""
        if not self._running or self._loop is None:
            raise Unavailable(f"model {self.model!r} is not running; the server is starting or stopping")
        if self._queued_rows + rows > self.max_queued:
            raise ResourceExhausted(
                f"model {self.model!r} has {self._queued_rows} steps queued and takes at most {self.max_queued} "
                "(setting max_queued_steps); retry later"
            )
        return self._loop

    def _queued(self) -> None:
        """After an enqueue: run the batch if it is due, else make sure the max-wait timer runs."""
        if self._batch_due():
            self._dispatch()
        elif self._timer is None:
            self._arm_timer()

    # -- when a batch runs ------------------------------------------------------------------------

    def _batch_due(self) -> bool:
        return bool(self._queue) and (self._waited or self._queued_rows >= min(self.max_batch, self._live_sessions()))

    def _arm_timer(self) -> None:
        assert self._loop is not None
        waited = time.perf_counter() - self._queue[0].queued_at
        self._timer = self._loop.call_later(max(0.0, self.max_wait - waited), self._max_wait_passed)

    def _max_wait_passed(self) -> None:
        self._timer = None
        self._waited = True
        self._dispatch()

    def _dispatch(self) -> None:
        """A batch is due: inline, run the due batches now; with a worker thread, wake the batching task."""
        if self._executor is not None:
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
            return
        while self._batch_due():  # synchronous: stop() cannot run in between, so nothing is left in flight
            batch = self._take()
            try:
                self._run_inline(batch)
            except Exception as e:  # pragma: no cover - defensive: a bug must not strand sessions in flight
                self._batch_failed(batch, e)
        if self._queue and self._timer is None:
            self._arm_timer()

    def _take(self) -> list[Entry]:
        """The next batch off the queue (at most max_batch rows, oldest first); the wait starts again for the rest."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waited = False
        queue, batch, rows, most = self._queue, [], 0, self.max_batch
        while queue and rows + queue[0].rows <= most:  # an entry has at most max_batch rows: one always fits
            entry = queue.popleft()
            batch.append(entry)
            rows += entry.rows
        self._queued_rows -= rows
        return batch

    async def _run_threaded_forever(self) -> None:
        assert self._loop is not None
        while self._running:
            while self._running and not self._batch_due():
                self._wake = self._loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
            if not self._running:
                return
            batch = self._in_flight = self._take()
            try:
                await self._run_threaded(batch)
            except Exception as e:  # pragma: no cover - defensive: the batching task must never die
                self._batch_failed(batch, e)
            finally:
                self._in_flight = []
            if self._queue and self._timer is None:
                self._arm_timer()

    def _batch_failed(self, batch: list[Entry], error: Exception) -> None:
        """Not an engine failure (those fail only their own steps): every step of the batch is answered, once."""
        with session_log_fields(None):  # many sessions' steps: the task's own session is not the one
            log.error("batch failed", exc_info=error, extra={"model": self.model, "steps": len(batch)})
        for req in batch:
            req.fail(error)

    # -- running a batch --------------------------------------------------------------------------

    def _run_inline(self, batch: list[Entry]) -> None:
        """One engine call per step shape, on the event loop; then the batch's metrics, once."""
        for t, group, rows in self._prepare(batch):
            slots, x = inputs(group, rows)
            try:
                t0 = time.perf_counter()
                y = self.engine.run_slots(slots, x)
            except Exception as e:  # fails only this call's failing steps; the other groups still run
                failure = e
            else:
                self._deliver(t, group, rows, y, time.perf_counter() - t0)
                continue
            self._settle(t, group, self._isolate(t, group, rows, failure))  # outside `except`: no chained tracebacks

    async def _run_threaded(self, batch: list[Entry]) -> None:
        """As ``_run_inline``, with each engine call in the worker thread (the event loop goes on meanwhile)."""
        assert self._loop is not None
        for t, group, rows in self._prepare(batch):
            slots, x = inputs(group, rows)
            try:
                t0 = time.perf_counter()
                y = await self._loop.run_in_executor(self._executor, self.engine.run_slots, slots, x)
            except Exception as e:
                failure = e
            else:
                self._deliver(t, group, rows, y, time.perf_counter() - t0)
                continue
            # The retries run in the worker thread too; the futures are settled here, on the loop.
            isolated = await self._loop.run_in_executor(self._executor, self._isolate, t, group, rows, failure)
            self._settle(t, group, isolated)

    def _prepare(self, batch: list[Entry]) -> list[tuple[int, list[Unit], list[int] | None]]:
        """The steps still wanted, as engine calls (T, the call's entries, their ``rows_of``): grouped by step
        shape, split to fit ``max_batch_steps`` (a group's rows stay in one call). Their time in the queue is
        observed here."""
        start = time.perf_counter()
        live: list[Entry] = []
        for req in batch:
            if req.future.cancelled():  # the caller went away while it was queued: never run
                req.finish(0)
            else:
                live.append(req)
        rows = rows_of(live)
        self._m_wait.observe_elapsed(start, [r.queued_at for r in live], rows)
        self._m_messages.inc(len(live))
        by_shape: dict[tuple[int, ...], list[Entry]] = {}
        for req in live:  # equal T and frame shape (a dynamic frame dim may differ between sessions)
            by_shape.setdefault(req.step_shape(), []).append(req)
        calls: list[tuple[int, list[Unit], list[int] | None]] = []
        for shape, group in by_shape.items():  # at most max_batch_steps rows x steps per call: bounded memory
            t = shape[0]
            calls += [
                (t, call, None if rows is None else rows_of(call))  # no group in the batch: none in a call
                for call in pack(group, max(1, self.max_batch_steps // t))
            ]
        return calls

    def _deliver(self, t: int, group: list[Unit], rows: list[int] | None, y: np.ndarray, engine_s: float) -> None:
        """Hand each step its rows of y (``rows``: the call's ``rows_of``); then the call's metrics (latency: queued
        until its output is ready)."""
        if rows is None:  # a row per entry: each gets a [T, *out] view
            for req, row in zip(group, y, strict=True):
                req.complete(t, row)
        else:
            offset = 0
            for req, n in zip(group, rows, strict=True):
                req.complete(t, y[offset] if type(req) is not Group else y[offset : offset + n])
                offset += n
        end = time.perf_counter()
        self._m_latency.observe_elapsed(end, [r.queued_at for r in group], rows)
        # tracing on: a batch span when a step of it was kept, whose ids are this call's exemplar
        exemplar = self._tracer.delivered(alone(group, rows), t, engine_s, end) if self._tracer is not None else None
        self._m_engine.observe(engine_s, exemplar)
        self._m_batch.observe(len(y), exemplar)
        self._m_steps.inc(len(y) * t)
        self._m_session_steps.inc(len(y))

    # -- after a failed engine call ----------------------------------------------------------------

    def _isolate(self, t: int, group: list[Unit], rows: list[int] | None, error: Exception) -> Isolated:
        """Retry a failed group in halves until each failing step stands alone; returns the calls that ran and
        the steps that failed alone, with their errors. Touches no future (it may run in the worker thread).

        Bounded: each call splits a failed group in two, so a group of n makes at most 2(n-1) more calls. An
        engine whose memory grows with the batch may run every half: then nothing fails.
        """
        if len(group) > 1:  # one line per failed call; each step found failing is logged once (_settle)
            with session_log_fields(None):  # many sessions' steps: the task's own session is not the one
                log.warning(
                    "engine call failed; retrying its steps in halves",
                    extra={"model": self.model, "batch": len(group), "t": t, "error": describe_error(error)},
                )
        ran: list[Ran] = []
        failed: list[tuple[Unit, Exception]] = []
        group = alone(group, rows)  # a gateway's rows are retried one by one, like single steps
        suspects = [(group, error)]  # groups whose last call failed
        while suspects:
            group, error = suspects.pop()
            if len(group) == 1:
                failed.append((group[0], error))
                continue
            mid = len(group) // 2
            for half in (group[:mid], group[mid:]):
                slots, x = inputs(half, None)
                try:
                    t0 = time.perf_counter()
                    y = self.engine.run_slots(slots, x)
                except Exception as e:
                    suspects.append((half, e))
                else:
                    ran.append((half, y, time.perf_counter() - t0))
        return ran, failed

    def _settle(self, t: int, call: list[Unit], isolated: Isolated) -> None:
        """After the failed ``call``: deliver what ran; fail each step that failed alone with a code that says why
        (logged, counted); then answer the call's gateway groups, whose rows are all settled now."""
        ran, failed = isolated
        for group, y, engine_s in ran:
            self._deliver(t, group, None, y, engine_s)  # single steps and rows alone
        for req, error in failed:
            step_error = step_failed(self.model, t, error)
            with session_log_fields(req.owner.log_fields() if req.owner is not None else None):  # the step's own
                log.error(
                    "engine failed on a step",
                    exc_info=None if isinstance(step_error, StepOutOfMemory) else error,  # a bug's traceback, not OOM's
                    extra={"model": self.model, "t": t, "code": step_error.code.name, "error": describe_error(error)},
                )
            self._m_failures.labels(model=self.model, code=step_error.code.name).inc()
            if self._tracer is not None:
                self._tracer.failed(req, step_error, t)
            req.fail(step_error)
        for entry in call:
            if type(entry) is Group:
                entry.settled(t)
