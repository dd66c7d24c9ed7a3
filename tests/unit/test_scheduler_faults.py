"""Scheduler fault isolation: whatever fails while a batch runs, every step of it is answered and finished once;
an engine failure fails only the steps that fail alone (the rest of their call, other lengths and the queue run),
with a code that says why, and leaves the failed step's session state as if it had never been sent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fake_engine import EngineFailure, FakeEngine, expected_row
from prometheus_client import CollectorRegistry

from cellserve.model.manifest import load_manifest
from cellserve.server.engine import Engine
from cellserve.server.errors import StepFailed, StepOutOfMemory
from cellserve.server.metrics import Metrics
from cellserve.server.scheduler import Scheduler
from cellserve.server.state_pool import StatePool

MODES = ["inline", "thread"]
LONG_WAIT_US = 10_000_000  # never reached: every batch here closes when all live sessions are in
MARKER = 255  # an input value the failing engines below refuse (a valid token of the tiny model)


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
    assert all(isinstance(f, StepFailed) and isinstance(f.__cause__, EngineFailure) for f in failed)
    assert float(ok[0, 0]) == 5.0


# -- failure isolation, on the fake engine ------------------------------------------------------------


def x_of(slot: int, t: int, bad: bool = False) -> np.ndarray:
    """A step of T tokens for ``slot`` (slot*10 + i), or all MARKER when ``bad``."""
    return np.full(t, MARKER, np.int64) if bad else np.arange(slot * 10, slot * 10 + t, dtype=np.int64)


async def run_batch(
    scheduler: Scheduler, steps: list[tuple[int, np.ndarray]], finished: dict[int, list[int]]
) -> dict[int, object]:
    """Enqueue ``(slot, x)`` steps (one batch when they are all the live sessions); each slot's outcome."""
    futures = {slot: scheduler.enqueue(slot, x, finished.setdefault(slot, []).append) for slot, x in steps}
    outcomes = await asyncio.wait_for(asyncio.gather(*futures.values(), return_exceptions=True), 30)
    return dict(zip(futures, outcomes, strict=True))


def run_one_batch(scheduler: Scheduler, steps: list[tuple[int, np.ndarray]], finished: dict[int, list[int]]
                  ) -> dict[int, object]:  # fmt: skip
    """Start ``scheduler`` on a fresh event loop, run ``steps`` (``run_batch``), stop it; each slot's outcome."""

    async def main() -> dict[int, object]:
        scheduler.start()
        try:
            return await run_batch(scheduler, steps, finished)
        finally:
            await scheduler.stop()

    return asyncio.run(main())


def fake_scheduler(
    engine: FakeEngine, registry: CollectorRegistry, mode: str, live: int, max_batch: int = 64,
    max_wait_us: int = LONG_WAIT_US,
) -> Scheduler:  # fmt: skip
    return Scheduler(engine, Metrics(registry), max_batch=max_batch, max_wait_us=max_wait_us, max_queued=64,
                     mode=mode, live_sessions=lambda: live)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_step_fails_alone_and_its_call_other_lengths_and_the_queue_complete(mode):
    engine, registry = FakeEngine(), CollectorRegistry()
    engine.fail_on = lambda slots, x: bool((x == MARKER).any())  # fails any call that holds the bad step
    # One batch of 4 (max_batch): T=2 first, with the bad step in it, then T=1; a fifth step waits in the queue.
    steps = [(0, x_of(0, 2, bad=True)), (1, x_of(1, 2)), (2, x_of(2, 1)), (3, x_of(3, 2)), (4, x_of(4, 1))]
    finished: dict[int, list[int]] = {}
    scheduler = fake_scheduler(engine, registry, mode, live=5, max_batch=4, max_wait_us=1000)  # for the 5th
    outcomes = run_one_batch(scheduler, steps, finished)
    bad = outcomes.pop(0)
    assert isinstance(bad, StepFailed) and not isinstance(bad, StepOutOfMemory)
    assert bad.code == grpc.StatusCode.INTERNAL
    assert "T=2" in bad.message and "did not apply it" in bad.message
    assert "slots" not in bad.message  # the engine's own text stays in the server log
    assert finished[0] == [0]
    for slot, y in outcomes.items():
        x = dict(steps)[slot]
        np.testing.assert_array_equal(y, expected_row(slot, x))
        assert finished[slot] == [len(x)]
    # T=2 [0, 1, 3] fails; halves [0] (fails alone) and [1, 3] run; then T=1 [2]; the queued step [4] after.
    assert engine.calls[:4] == [([0, 1, 3], 2), ([0], 2), ([1, 3], 2), ([2], 1)]
    assert engine.calls[4:] == [([4], 1)]
    assert registry.get_sample_value("cellserve_engine_failures_total", {"model": "fake", "code": "INTERNAL"}) == 1


OOM_ERRORS = {
    "MemoryError": lambda m: MemoryError(m),
    "onnxruntime arena": lambda m: RuntimeError(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running LSTM node. "
        "Failed to allocate memory for requested buffer of size 1073741824"
    ),
    "bad_alloc": lambda m: RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bad_alloc"),
    "CUDA": lambda m: RuntimeError("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc((void**)&p, size);"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", OOM_ERRORS)
def test_out_of_memory_on_a_long_chunk_is_resource_exhausted_for_that_step_only(mode, kind):
    engine, registry = FakeEngine(), CollectorRegistry()
    engine.fail_on = lambda slots, x: x.shape[1] > 4  # memory grows with T: a long chunk does not fit
    engine.failure = OOM_ERRORS[kind]
    steps = [(0, x_of(0, 8)), (1, x_of(1, 2)), (2, x_of(2, 2))]
    finished: dict[int, list[int]] = {}
    outcomes = run_one_batch(fake_scheduler(engine, registry, mode, live=3), steps, finished)
    long = outcomes[0]
    assert isinstance(long, StepOutOfMemory) and long.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in long.message and "T=8" in long.message and "shorter chunks" in long.message
    assert "requested buffer" not in long.message and "cudaMalloc" not in long.message
    for slot in (1, 2):
        np.testing.assert_array_equal(outcomes[slot], expected_row(slot, dict(steps)[slot]))
    assert finished == {0: [0], 1: [2], 2: [2]}
    assert (
        registry.get_sample_value("cellserve_engine_failures_total", {"model": "fake", "code": "RESOURCE_EXHAUSTED"})
        == 1
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_too_big_for_memory_runs_in_halves_and_no_step_fails(mode):
    engine, registry = FakeEngine(), CollectorRegistry()
    engine.fail_on = lambda slots, x: x.shape[0] * x.shape[1] > 8  # memory grows with B * T
    engine.failure = lambda m: MemoryError(m)
    steps = [(slot, x_of(slot, 4)) for slot in range(4)]
    finished: dict[int, list[int]] = {}
    outcomes = run_one_batch(fake_scheduler(engine, registry, mode, live=4), steps, finished)
    for slot, x in steps:
        np.testing.assert_array_equal(outcomes[slot], expected_row(slot, x))
    assert engine.calls == [([0, 1, 2, 3], 4), ([0, 1], 4), ([2, 3], 4)]
    assert (
        registry.get_sample_value("cellserve_engine_failures_total", {"model": "fake", "code": "RESOURCE_EXHAUSTED"})
        is None
    )


@pytest.mark.parametrize("mode", MODES)
def test_retries_are_bounded_when_every_step_fails(mode):
    engine, registry = FakeEngine(), CollectorRegistry()
    engine.fail_on = lambda slots, x: True  # a broken engine: each step fails alone
    n = 8
    finished: dict[int, list[int]] = {}
    steps = [(slot, x_of(slot, 1)) for slot in range(n)]
    outcomes = run_one_batch(fake_scheduler(engine, registry, mode, live=n), steps, finished)
    assert all(isinstance(o, StepFailed) for o in outcomes.values())
    assert len(engine.calls) == 1 + 2 * (n - 1)  # the call, then every split of a failed group in two
    assert finished == {slot: [0] for slot in range(n)}


# -- the failed step's state, on the real engine ----------------------------------------------------


class _DownloadFails:
    """Array ops whose ``download`` fails: y cannot reach the host after the run and the scatter (an OOM there)."""

    def __init__(self, ops: Any) -> None:
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def download(self, arr: Any) -> np.ndarray:
        raise MemoryError("Unable to allocate 1.00 GiB for an array with shape (64, 2048, 256)")


class FailingOnMarker:
    """The real Engine, whose call fails late — after onnxruntime ran and the state was scattered — whenever a
    step in it holds MARKER: the worst place for a failure, since the slots were already written."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.manifest = engine.manifest
        self.calls: list[int] = []  # batch size of each call

    def run_slots(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(slots))
        ops = self.engine.ops
        if (x == MARKER).any():
            self.engine.ops = _DownloadFails(ops)
        try:
            return self.engine.run_slots(slots, x)
        finally:
            self.engine.ops = ops


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_step_leaves_its_session_as_if_it_was_never_sent(mode, tiny_model_dir: Path, tiny_oracle):
    manifest = load_manifest(tiny_model_dir)
    pool = StatePool(manifest.states, 4)
    engine = FailingOnMarker(Engine(manifest, tiny_model_dir, pool, intra_op_threads=1))
    slots = [pool.allocate(object()) for _ in range(3)]
    rng = np.random.default_rng(7)
    chunks = rng.integers(0, MARKER, size=(3, 3, 4), dtype=np.int64)  # [round, session, T]: no MARKER in them
    bad = np.full(4, MARKER, np.int64)
    finished: dict[int, list[int]] = {}

    async def main() -> list[dict[int, object]]:
        scheduler = Scheduler(engine, Metrics(CollectorRegistry()), max_batch=8, max_wait_us=LONG_WAIT_US,  # type: ignore[arg-type]
                              max_queued=8, mode=mode, live_sessions=lambda: 3)  # fmt: skip
        scheduler.start()
        try:
            first = await run_batch(scheduler, [(s, chunks[0, i]) for i, s in enumerate(slots)], finished)
            # session 0 sends a step that fails; the others step on, in the same engine call
            failed = await run_batch(
                scheduler, [(slots[0], bad), *((s, chunks[1, i]) for i, s in enumerate(slots) if i)], finished
            )
            # session 0 then sends what it meant to send; the others their third chunk
            again = await run_batch(
                scheduler, [(slots[0], chunks[1, 0]), *((s, chunks[2, i]) for i, s in enumerate(slots) if i)], finished
            )
            return [first, failed, again]
        finally:
            await scheduler.stop()

    first, failed, again = asyncio.run(main())
    assert isinstance(failed[slots[0]], StepOutOfMemory)
    zeros = np.zeros((manifest.layers, 1, manifest.hidden), np.float32)  # [L, 1, H]
    for i, slot in enumerate(slots):
        sent = [chunks[0, i], chunks[1, i]] + ([] if i == 0 else [chunks[2, i]])  # the failed step is not in it
        got = [first[slot], again[slot]] if i == 0 else [first[slot], failed[slot], again[slot]]
        y_ref, _, _ = tiny_oracle.run(np.concatenate(sent)[None], zeros, zeros)  # [1, T, O]
        np.testing.assert_allclose(np.concatenate(got), y_ref[0], atol=1e-5, rtol=0)
    assert finished[slots[0]] == [4, 0, 4]
