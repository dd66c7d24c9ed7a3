"""The DataPlane on the tiny model (onnxruntime, no gRPC): many sessions' steps with entries failing alone,
resume tokens round-tripping through open and snapshot, and stateless rows that borrow (and give back)
counted pool slots, also when their caller is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from cellserve.server.metrics import Metrics
from cellserve.server.models import ModelRepository
from cellserve.server.resume_token import TokenCodec, TokenKeys
from cellserve.server.sessions import SessionManager
from cellserve.server.settings import Settings


class Plane:
    def __init__(self, tiny_model: Any) -> None:
        settings = Settings(model_dirs=[tiny_model.dir], metrics_port=0, capacity=8)
        self.registry = CollectorRegistry()
        metrics = Metrics(self.registry)
        self.models = ModelRepository.load(settings, metrics)
        self.sessions = SessionManager(self.models, settings, metrics)
        self.plane = DataPlane(self.models, self.sessions, TokenCodec(TokenKeys.generate(), 60), settings)

    def used(self) -> float | None:
        return self.registry.get_sample_value("cellserve_state_pool_slots", {"model": "tiny", "state": "used"})


@pytest.fixture
def on_plane(tiny_model: Any) -> Callable[[Callable[[Plane], Awaitable[None]]], None]:
    """Run ``test(plane)`` on a fresh event loop with the model's scheduler started (and stopped after)."""

    def run(test: Callable[[Plane], Awaitable[None]]) -> None:
        async def main() -> None:
            p = Plane(tiny_model)
            for model in p.models:
                model.scheduler.start()
            try:
                await test(p)
            finally:
                for model in p.models:
                    await model.scheduler.stop()

        asyncio.run(main())

    return run


def tokens(seed: int, t: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=t, dtype=np.int64)  # [T]


def test_step_many_answers_each_entry_and_a_bad_entry_fails_alone(on_plane):
    async def test(plane: Plane) -> None:
        p = plane.plane
        a, b, c, d, ref = (p.open("tiny") for _ in range(5))
        p.close(c)
        x = np.stack([tokens(1), tokens(2), tokens(3), tokens(4), tokens(5)])  # [N, T]
        x[1, 2] = 999  # out of the vocabulary: row 1 alone fails
        result = await p.step_many([a, b, c, a, None], x, {4: FailedPrecondition("no such handle")})
        assert set(result.errors) == {1, 2, 3, 4}
        assert isinstance(result.errors[1], InvalidArgument) and "token id 999" in str(result.errors[1])
        assert isinstance(result.errors[2], FailedPrecondition) and "closed" in str(result.errors[2])
        assert "appears twice" in str(result.errors[3])
        assert result.y is not None and result.y.shape[:2] == (5, 4)
        np.testing.assert_allclose(result.y[0], await p.step(ref, tokens(1)), atol=1e-6)
        assert not result.y[1:].any()  # failed rows are zeros
        assert (a.steps, b.steps, d.steps) == (4, 0, 0)  # the failed entry's session goes on with its state unchanged
        assert not a.inflight and not b.inflight
        with pytest.raises(InvalidArgument, match="dtype int32"):  # the whole message is wrong: nothing runs
            await p.step_many([d], x[:1].astype(np.int32))

    on_plane(test)


def test_step_many_past_max_batch_runs_as_several_entries_equal_to_single_steps(tiny_model):
    """More rows than max_batch (3 here): split into scheduler entries, each row equal to a session stepped alone."""

    async def main() -> None:
        settings = Settings(model_dirs=[tiny_model.dir], metrics_port=0, capacity=16, max_batch=3)
        metrics = Metrics(CollectorRegistry())
        models = ModelRepository.load(settings, metrics)
        sessions = SessionManager(models, settings, metrics)
        p = DataPlane(models, sessions, TokenCodec(TokenKeys.generate(), 60), settings)
        for model in models:
            model.scheduler.start()
        try:
            many = [p.open("tiny") for _ in range(7)]
            alone = [p.open("tiny") for _ in range(7)]
            for step in range(3):
                x = np.stack([tokens(10 * step + i) for i in range(7)])
                result = await p.step_many(many, x)
                assert not result.errors and result.y is not None
                for i, session in enumerate(alone):
                    np.testing.assert_allclose(result.y[i], await p.step(session, x[i]), atol=1e-6)
            assert [s.steps for s in many] == [12] * 7
        finally:
            for model in models:
                await model.scheduler.stop()

    asyncio.run(main())


def test_a_snapshot_token_opens_a_session_with_the_same_state(on_plane):
    async def test(plane: Plane) -> None:
        p = plane.plane
        first = p.open("", idle_timeout_s=30)  # "" is the default model
        assert first.model.name == "tiny" and first.idle_timeout_s == 30
        await p.step(first, tokens(3))
        snap = p.snapshot(first)
        resumed = p.open("tiny", resume_token=snap.token)
        assert snap.steps == resumed.steps == 4
        for a, b in zip(p.state(first).states, p.state(resumed).states, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(await p.step(first, tokens(4)), await p.step(resumed, tokens(4)), atol=1e-6)
        p.close(first)
        with pytest.raises(FailedPrecondition):
            p.snapshot(first)
        assert p.parting_snapshot(first) is None  # only a drain's close keeps a parting token

    on_plane(test)


def test_infer_equals_a_session_and_gives_every_borrowed_slot_back(on_plane):
    async def test(plane: Plane) -> None:
        p = plane.plane
        session = p.open("tiny")
        x = np.stack([tokens(5), tokens(6)])  # [B, T]
        y_first, states = await p.infer("tiny", x[:, :2], [None, None])
        y_rest, _ = await p.infer("tiny", x[:, 2:], states)
        row0 = np.concatenate([await p.step(session, x[0, :2]), await p.step(session, x[0, 2:])])
        np.testing.assert_allclose(np.concatenate([y_first[0], y_rest[0]]), row0, atol=1e-5)
        assert plane.used() == 1  # the open session's; the rows' slots are back
        assert plane.sessions.count == 1  # stateless rows are no sessions: nothing to expire, drain or count

    on_plane(test)


def test_a_cancelled_infer_frees_its_slots_and_a_draining_plane_refuses(on_plane):
    async def test(plane: Plane) -> None:
        p = plane.plane
        task = asyncio.ensure_future(p.infer("tiny", np.stack([tokens(7)] * 3), [None, None]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if plane.used() == 0:
                break
            await asyncio.sleep(0.01)
        assert plane.used() == 0 and plane.models.get("tiny").pool.used == 0
        plane.sessions.refuse_opens()
        assert not p.accepting
        with pytest.raises(Unavailable):
            await p.infer("tiny", np.stack([tokens(8)]), [None, None])
        with pytest.raises(Unavailable):
            p.open("tiny")

    on_plane(test)
