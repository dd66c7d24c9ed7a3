"""The Scheduler's batch-closing rules, against a fake engine (no gRPC server, no onnxruntime).

A batch closes at ``max_batch`` steps, when every live session is in, or ``max_wait_us`` after its oldest
step; steps beyond ``max_batch`` wait for the next batch; cancelled steps never run; an engine failure fails
only the steps that fail alone (more in test_scheduler_faults.py). Inline, the step that completes a batch runs
it inside ``enqueue``; with ``engine_mode=thread`` a task runs it in the worker thread. No assertion here
depends on timing: each checks which steps went into which engine call, or what is done before the event loop
turns.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pytest
from fake_engine import FakeEngine, expected_row
from prometheus_client import CollectorRegistry

from cellserve.server.errors import ResourceExhausted, StepFailed, Unavailable
from cellserve.server.metrics import Metrics
from cellserve.server.scheduler import Scheduler

LONG_WAIT_US = 10_000_000  # never reached: the batch must close by another rule
SHORT_WAIT_US = 1_000


class Harness:
    """A Scheduler on a fake engine, with each slot's ``finished(steps)`` calls recorded."""

    def __init__(
        self, *, max_batch: int = 64, live: int = 64, max_wait_us: int = LONG_WAIT_US, max_queued: int = 1024,
        mode: str = "inline", max_batch_steps: int = 1 << 30,
    ) -> None:  # fmt: skip
        self.engine = FakeEngine()
        self.registry = CollectorRegistry()
        self.live = live
        self.scheduler = Scheduler(self.engine, Metrics(self.registry), max_batch=max_batch, max_wait_us=max_wait_us,
                                   max_queued=max_queued, mode=mode, live_sessions=lambda: self.live,
                                   max_batch_steps=max_batch_steps)  # fmt: skip
        self.finished: dict[int, list[int]] = defaultdict(list)

    def step(self, slot: int, t: int = 1) -> asyncio.Future[np.ndarray]:
        """Queue a step of T tokens for ``slot`` (input values slot*100 + i, so outputs tell them apart)."""
        return self.scheduler.enqueue(slot, self.x(slot, t), self.finished[slot].append)

    @staticmethod
    def x(slot: int, t: int = 1) -> np.ndarray:
        return np.arange(slot * 100, slot * 100 + t, dtype=np.int64)

    def metric(self, name: str) -> float | None:
        return self.registry.get_sample_value(name, {"model": "fake"})


def run(harness: Harness, body: Callable[[Harness], object]) -> None:
    """Start the scheduler on a fresh event loop, await ``body(harness)``, stop it."""

    async def main() -> None:
        harness.scheduler.start()
        try:
            await body(harness)  # type: ignore[misc]
        finally:
            await harness.scheduler.stop()

    asyncio.run(main())


def test_a_full_batch_of_max_batch_runs_inside_the_enqueue_that_completes_it():
    h = Harness(max_batch=4, live=100)

    async def body(h: Harness) -> None:
        futures = [h.step(slot) for slot in range(3)]
        assert h.engine.calls == [] and not any(f.done() for f in futures)
        futures.append(h.step(3))  # the fourth step closes the batch, before the event loop turns
        assert h.engine.calls == [([0, 1, 2, 3], 1)]
        for slot, f in enumerate(futures):
            np.testing.assert_array_equal(f.result(), expected_row(slot, h.x(slot)))
        assert dict(h.finished) == {0: [1], 1: [1], 2: [1], 3: [1]}

    run(h, body)
    assert h.metric("cellserve_batch_size_count") == 1 and h.metric("cellserve_batch_size_sum") == 4
    assert h.metric("cellserve_steps_total") == 4


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_a_batch_past_max_batch_steps_runs_as_several_calls_each_within_it(mode):
    h = Harness(max_batch=8, live=8, max_batch_steps=10, mode=mode)

    async def body(h: Harness) -> None:
        futures = [h.step(slot, t=4 if slot < 5 else 1) for slot in range(8)]  # 5 steps of T=4, 3 of T=1
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        for slot, f in enumerate(futures):
            np.testing.assert_array_equal(f.result(), expected_row(slot, h.x(slot, 4 if slot < 5 else 1)))

    run(h, body)
    # rows x T <= 10: two rows of T=4 per call, all three T=1 rows in one
    assert h.engine.calls == [([0, 1], 4), ([2, 3], 4), ([4], 4), ([5, 6, 7], 1)]


def test_a_batch_closes_once_every_live_session_is_in():
    h = Harness(max_batch=64, live=3)

    async def body(h: Harness) -> None:
        first = [h.step(7), h.step(2)]
        assert h.engine.calls == []
        last = h.step(5)  # the third live session's step: nobody else can arrive
        assert h.engine.calls == [([7, 2, 5], 1)]
        assert all(f.done() for f in [*first, last])

    run(h, body)


def test_fewer_steps_than_live_sessions_run_max_wait_after_the_oldest():
    h = Harness(max_batch=64, live=5, max_wait_us=SHORT_WAIT_US)

    async def body(h: Harness) -> None:
        a, b = h.step(0), h.step(1)  # b is queued before the loop turns: inside a's window
        assert h.engine.calls == [] and not a.done()
        await asyncio.wait_for(asyncio.gather(a, b), 10)
        assert h.engine.calls == [([0, 1], 1)]  # one call, when the oldest step's max_wait passed
        c = h.step(2)  # a new window starts with the next oldest step
        await asyncio.wait_for(c, 10)
        assert h.engine.calls == [([0, 1], 1), ([2], 1)]

    run(h, body)


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_steps_beyond_max_batch_wait_for_the_next_batch_oldest_first(mode):
    h = Harness(max_batch=2, live=10, max_wait_us=SHORT_WAIT_US, mode=mode)

    async def body(h: Harness) -> None:
        futures = [h.step(slot) for slot in range(7)]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        # two full batches each time one is due, then the lone leftover after its max_wait
        assert h.engine.calls == [([0, 1], 1), ([2, 3], 1), ([4, 5], 1), ([6], 1)]
        for slot, f in enumerate(futures):
            np.testing.assert_array_equal(f.result(), expected_row(slot, h.x(slot)))

    run(h, body)


def test_steps_of_different_lengths_in_one_batch_run_as_one_call_per_length():
    h = Harness(live=3)

    async def body(h: Harness) -> None:
        futures = [h.step(0, t=1), h.step(1, t=2), h.step(2, t=1)]
        assert h.engine.calls == [([0, 2], 1), ([1], 2)]
        for slot, f, t in zip(range(3), futures, (1, 2, 1), strict=True):
            np.testing.assert_array_equal(f.result(), expected_row(slot, h.x(slot, t)))
        assert dict(h.finished) == {0: [1], 1: [2], 2: [1]}

    run(h, body)
    assert h.metric("cellserve_batch_size_count") == 2 and h.metric("cellserve_steps_total") == 4


def test_a_step_cancelled_while_queued_never_runs_and_finishes_with_0_steps():
    h = Harness(live=2)

    async def body(h: Harness) -> None:
        gone = h.step(0)
        gone.cancel()  # its caller went away while it waited for the batch
        kept = h.step(1)  # closes the batch of both (every live session is in): only this one runs
        assert h.engine.calls == [([1], 1)]
        np.testing.assert_array_equal(kept.result(), expected_row(1, h.x(1)))
        assert h.finished == {0: [0], 1: [1]}

    run(h, body)
    assert h.metric("cellserve_batch_size_sum") == 1


def test_a_batch_whose_steps_were_all_cancelled_makes_no_engine_call(wait_until):
    h = Harness(live=3, max_wait_us=SHORT_WAIT_US)

    async def body(h: Harness) -> None:
        futures = [h.step(0), h.step(1)]
        for f in futures:
            f.cancel()
        await wait_until.aio(lambda: h.finished[0] and h.finished[1], timeout_s=10)  # the max-wait timer closed it
        assert h.finished == {0: [0], 1: [0]} and h.engine.calls == []

    run(h, body)


@pytest.mark.parametrize(
    ("failing_t", "calls", "failed"),
    [(1, [([0, 2], 1), ([0], 1), ([2], 1), ([1], 2)], {0, 2}), (2, [([0, 2], 1), ([1], 2)], {1})],
)
def test_an_engine_failure_fails_only_the_steps_that_fail_alone(failing_t, calls, failed):
    h = Harness(live=3)
    h.engine.fail_on = lambda slots, x: x.shape[1] == failing_t
    lengths = {0: 1, 1: 2, 2: 1}  # one batch, two engine calls: T=1 (slots 0 and 2), then T=2 (slot 1)

    async def body(h: Harness) -> None:
        futures = {slot: h.step(slot, t) for slot, t in lengths.items()}
        assert h.engine.calls == calls  # a failed call is retried in halves; the other T's call still runs
        for slot, f in futures.items():
            if slot in failed:
                with pytest.raises(StepFailed):
                    f.result()
                assert h.finished[slot] == [0]
            else:
                np.testing.assert_array_equal(f.result(), expected_row(slot, h.x(slot, lengths[slot])))
                assert h.finished[slot] == [lengths[slot]]
        h.engine.fail_on = None
        again = [h.step(slot) for slot in range(3)]  # the scheduler goes on batching after a failure
        assert all(f.done() and f.exception() is None for f in again)

    run(h, body)


def test_inline_runs_on_the_event_loop_and_thread_mode_in_the_engine_thread():
    inline, threaded = Harness(live=1), Harness(live=1, mode="thread")

    async def on_loop(h: Harness) -> None:
        f = h.step(0)
        assert f.done()  # inline: the caller resumes without waiting a turn of the event loop
        assert h.engine.threads == [threading.current_thread().name]

    async def in_thread(h: Harness) -> None:
        f = h.step(0)
        assert not f.done() and h.engine.calls == []  # due, but the batching task has not run it yet
        np.testing.assert_array_equal(await asyncio.wait_for(f, 10), expected_row(0, h.x(0)))
        assert h.engine.threads[0].startswith("engine-fake")
        assert h.engine.threads[0] != threading.current_thread().name

    run(inline, on_loop)
    run(threaded, in_thread)


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_stop_fails_the_queued_steps_with_unavailable_and_refuses_new_ones(mode):
    h = Harness(live=5, mode=mode)

    async def main() -> None:
        h.scheduler.start()
        queued = h.step(0)  # waits for more sessions (live=5) or max_wait (never, here)
        await h.scheduler.stop()
        with pytest.raises(Unavailable, match="shutting down"):
            queued.result()
        assert h.finished == {0: [0]} and h.engine.calls == []
        with pytest.raises(Unavailable, match="not running"):
            h.step(1)

    asyncio.run(main())


def test_a_full_queue_refuses_the_next_step_with_resource_exhausted():
    h = Harness(live=10, max_queued=2)

    async def main() -> None:
        h.scheduler.start()
        queued = [h.step(0), h.step(1)]
        with pytest.raises(ResourceExhausted, match="max_queued_steps"):
            h.step(2)
        assert h.finished[2] == [] and not any(f.done() for f in queued)  # refused: never queued, never finished
        await h.scheduler.stop()
        assert all(isinstance(f.exception(), Unavailable) for f in queued)

    asyncio.run(main())
