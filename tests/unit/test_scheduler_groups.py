"""Gateway groups in the scheduler (``enqueue_many``): a message of many sessions' steps is one queue entry with
one future, counts its rows towards max_batch, shares engine calls with single steps, and after a failed engine
call its rows are retried alone: the failing row fails alone, the others are answered."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pytest
from fake_engine import FakeEngine, expected_row
from prometheus_client import CollectorRegistry

from cellserve.server.batching import GroupResult
from cellserve.server.errors import ResourceExhausted, StepFailed
from cellserve.server.metrics import Metrics
from cellserve.server.scheduler import Scheduler

MODES = ["inline", "thread"]
MARKER = 255


def scheduler_of(engine: FakeEngine, registry: CollectorRegistry, mode: str, live: int, max_batch: int = 64,
                 max_queued: int = 64, max_wait_us: int = 10_000_000) -> Scheduler:  # fmt: skip
    return Scheduler(engine, Metrics(registry), max_batch=max_batch, max_wait_us=max_wait_us, max_queued=max_queued,
                     mode=mode, live_sessions=lambda: live)  # fmt: skip


def block(slots: list[int], t: int, bad: set[int] = frozenset()) -> np.ndarray:  # type: ignore[assignment]
    """[n, T] tokens: row i is slot*10 + 0..T-1, or all MARKER for the slots in ``bad``."""
    return np.stack(
        [np.full(t, MARKER, np.int64) if s in bad else np.arange(s * 10, s * 10 + t, dtype=np.int64) for s in slots]
    )


class Finished:
    """Records each ``finished(steps, failed)`` call of a group."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, set[int]]] = []

    def __call__(self, steps: int, failed: Mapping[int, Exception]) -> None:
        self.calls.append((steps, set(failed)))


@pytest.mark.parametrize("mode", MODES)
def test_a_group_and_single_steps_share_one_engine_call(mode):
    engine, registry = FakeEngine(), CollectorRegistry()

    async def main() -> tuple[GroupResult, np.ndarray]:
        scheduler = scheduler_of(engine, registry, mode, live=5)
        scheduler.start()
        try:
            done = Finished()
            group = scheduler.enqueue_many(np.array([0, 1, 2, 3]), block([0, 1, 2, 3], 2), done, [None] * 4)
            single = scheduler.enqueue(4, block([4], 2)[0], lambda steps: None)  # the 5th live session: batch due
            result, y = await asyncio.wait_for(asyncio.gather(group, single), 30)
            assert done.calls == [(2, set())]
            return result, y
        finally:
            await scheduler.stop()

    result, y = asyncio.run(main())
    assert engine.calls == [([0, 1, 2, 3, 4], 2)]  # one call for the group's 4 rows and the single step
    assert result.failed == {} and result.y is not None and result.y.shape[:2] == (4, 2)
    for i in range(4):
        np.testing.assert_array_equal(result.y[i], expected_row(i, block([i], 2)[0]))
    np.testing.assert_array_equal(y, expected_row(4, block([4], 2)[0]))
    assert registry.get_sample_value("cellserve_batch_size_sum", {"model": "fake"}) == 5
    assert registry.get_sample_value("cellserve_steps_total", {"model": "fake"}) == 10


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_row_of_a_group_fails_alone_and_the_other_rows_are_answered(mode):
    engine, registry = FakeEngine(), CollectorRegistry()
    engine.fail_on = lambda slots, x: bool((x == MARKER).any())

    async def main() -> tuple[GroupResult, Finished]:
        scheduler = scheduler_of(engine, registry, mode, live=6)
        scheduler.start()
        try:
            done = Finished()
            slots = [0, 1, 2, 3, 4, 5]
            result = await asyncio.wait_for(
                scheduler.enqueue_many(np.array(slots), block(slots, 1, bad={3}), done, [None] * 6), 30
            )
            return result, done
        finally:
            await scheduler.stop()

    result, done = asyncio.run(main())
    assert set(result.failed) == {3} and isinstance(result.failed[3], StepFailed)
    assert done.calls == [(1, {3})]  # once, naming the row that took no step
    assert result.y is not None
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(result.y[i], expected_row(i, block([i], 1)[0]))
    assert not result.y[3].any()
    assert registry.get_sample_value("cellserve_engine_failures_total", {"model": "fake", "code": "INTERNAL"}) == 1


@pytest.mark.parametrize("mode", MODES)
def test_groups_fill_batches_by_rows_not_by_entries(mode):
    """max_batch 4: groups of 3 and 2 cannot share a call; each entry stays whole in its call (the second runs
    when its max wait has passed)."""
    engine, registry = FakeEngine(), CollectorRegistry()

    async def main() -> None:
        scheduler = scheduler_of(engine, registry, mode, live=5, max_batch=4, max_wait_us=1000)
        scheduler.start()
        try:
            a = scheduler.enqueue_many(np.array([0, 1, 2]), block([0, 1, 2], 1), Finished(), [None] * 3)
            b = scheduler.enqueue_many(np.array([3, 4]), block([3, 4], 1), Finished(), [None] * 2)
            await asyncio.wait_for(asyncio.gather(a, b), 30)
        finally:
            await scheduler.stop()

    asyncio.run(main())
    assert sorted(engine.calls) == [([0, 1, 2], 1), ([3, 4], 1)]


def test_a_group_counts_its_rows_against_max_queued():
    async def main() -> None:
        scheduler = scheduler_of(FakeEngine(), CollectorRegistry(), "inline", live=100, max_queued=4)
        scheduler.start()
        try:
            first = scheduler.enqueue_many(np.array([0, 1, 2]), block([0, 1, 2], 1), Finished(), [None] * 3)
            with pytest.raises(ResourceExhausted, match="3 steps queued and takes at most 4"):
                scheduler.enqueue_many(np.array([3, 4]), block([3, 4], 1), Finished(), [None] * 2)
            first.cancel()
        finally:
            await scheduler.stop()

    asyncio.run(main())
