"""Scheduler fault isolation: whatever fails while a batch runs, every step of it is answered and finished once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fake_engine import FakeEngine
from prometheus_client import CollectorRegistry

from cellserve.server.metrics import Metrics
from cellserve.server.scheduler import Scheduler


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_a_failing_finished_callback_strands_no_other_step(mode):
    async def main() -> tuple[list[object], list[list[int]]]:
        scheduler = Scheduler(FakeEngine(), Metrics(CollectorRegistry()), max_batch=4, max_wait_us=1000,
                              max_queued=16, mode=mode, live_sessions=lambda: 3)  # fmt: skip
        scheduler.start()
        calls: list[list[int]] = [[], [], []]

        def finished(i: int):
            def record(steps: int) -> None:
                calls[i].append(steps)
                if i == 1:
                    raise ValueError("a bug in one session's bookkeeping")

            return record

        futures = [scheduler.enqueue(i, np.zeros(1, np.int64), finished(i)) for i in range(3)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        later = await scheduler.enqueue(0, np.zeros(1, np.int64), lambda steps: None)  # the scheduler still runs
        await scheduler.stop()
        return [*outcomes, later], calls

    outcomes, calls = asyncio.run(main())
    assert all(len(c) == 1 for c in calls), calls  # finished exactly once each, whatever happened
    assert all(isinstance(o, np.ndarray | BaseException) for o in outcomes)  # no step left unanswered
    assert isinstance(outcomes[-1], np.ndarray)


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_an_engine_failure_fails_its_batch_and_the_next_batch_runs(mode):
    async def main() -> tuple[list[object], np.ndarray]:
        engine = FakeEngine()
        scheduler = Scheduler(engine, Metrics(CollectorRegistry()), max_batch=2, max_wait_us=1000, max_queued=16,
                              mode=mode, live_sessions=lambda: 2)  # fmt: skip
        scheduler.start()
        steps: list[int] = []
        engine.fail_on = lambda slots, x: True  # an onnxruntime failure
        failed = await asyncio.gather(
            *(scheduler.enqueue(i, np.zeros(1, np.int64), steps.append) for i in range(2)), return_exceptions=True
        )
        engine.fail_on = None
        ok = await scheduler.enqueue(5, np.zeros(1, np.int64), steps.append)
        await scheduler.stop()
        assert steps == [0, 0, 1]  # the failed steps ran nothing; the next one ran one step
        return failed, ok

    failed, ok = asyncio.run(main())
    assert all(isinstance(f, RuntimeError) for f in failed)  # EngineFailure is one
    assert float(ok[0, 0]) == 5.0
