"""The SessionManager's idle expiry on a fake engine (no gRPC server, no onnxruntime): sessions expire at
their deadline and not before, touched or busy ones are re-queued, and closed sessions' heap entries are
compacted away. And resume: a state that fits the model (by name, or by position from a version-1 token) is
written into the new slot; one whose names, count, shapes or dtypes do not is FAILED_PRECONDITION."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from fake_engine import FakeEngine
from prometheus_client import CollectorRegistry
from token_helpers import v1_token

from cellserve.server.errors import FailedPrecondition
from cellserve.server.metrics import Metrics
from cellserve.server.models import ModelRepository
from cellserve.server.resume_state import ResumeState
from cellserve.server.resume_token import TokenCodec, TokenKeys
from cellserve.server.scheduler import Scheduler
from cellserve.server.sessions import SessionClosed, SessionManager
from cellserve.server.settings import Settings


class Served:
    """The tiny model behind a SessionManager, its batches run by a fake engine.

    The model is loaded as a server loads it (``ModelRepository.load``: manifest, pool, metrics); then its
    engine and scheduler are swapped for a FakeEngine and a Scheduler on it, so no step reaches onnxruntime.
    """

    def __init__(self, tiny_model: Any, **settings: Any) -> None:
        self.settings = Settings(model_dirs=[tiny_model.dir], metrics_port=0, **settings)
        self.registry = CollectorRegistry()
        metrics = Metrics(self.registry)
        models = ModelRepository.load(self.settings, metrics)
        self.model = models.get("tiny")
        self.pool = self.model.pool
        self.model.engine = FakeEngine(self.model.manifest)  # type: ignore[assignment]
        self.model.scheduler = Scheduler(self.model.engine, metrics, max_batch=self.settings.max_batch,
                                         max_wait_us=self.settings.max_wait_us,
                                         max_queued=self.settings.max_queued_steps,
                                         live_sessions=lambda: self.pool.used)  # fmt: skip
        self.manager = SessionManager(models, self.settings, metrics)

    def closed(self, reason: str) -> float | None:
        return self.registry.get_sample_value("cellserve_sessions_closed_total", {"model": "tiny", "reason": reason})


@pytest.fixture
def served(tiny_model: Any) -> Any:
    return lambda **settings: Served(tiny_model, **settings)


def test_an_idle_session_expires_at_its_deadline_and_not_before(served):
    s = served(idle_timeout_s=100)
    mgr, told = s.manager, []
    a = mgr.open("tiny", notify=told.append)
    now = time.monotonic()
    assert mgr.expire_idle(now + 50) == 0 and not a.closed and s.pool.used == 1
    assert mgr.expire_idle(now + 100) == 1
    assert a.closed and a.close_reason == "idle" and a.id not in mgr.sessions
    assert told == [SessionClosed("idle", "session idle for 100s (its idle timeout); state was freed")]
    assert s.pool.used == 0 and s.closed("idle") == 1
    assert s.registry.get_sample_value("cellserve_sessions_active", {"model": "tiny"}) == 0


def test_expiry_skips_touched_sessions(served):
    """The reaper's lazy heap re-queues sessions that were active since their entry was pushed."""
    mgr = served(idle_timeout_s=100, max_idle_timeout_s=1000).manager
    a, b = mgr.open("tiny"), mgr.open("tiny")
    now = time.monotonic()
    b.deadline = now + 1000  # b was touched recently; a was not
    first = mgr.expire_idle(now + 150)
    second = mgr.expire_idle(now + 2000)
    assert (first, second, a.closed and b.closed) == (1, 1, True)


def test_a_session_with_a_step_in_flight_is_requeued_and_expires_once_idle_after_it(served):
    s = served(idle_timeout_s=100, max_wait_us=1000)

    async def main() -> None:
        s.model.scheduler.start()
        mgr = s.manager
        busy, other = mgr.open("tiny"), mgr.open("tiny")
        step = busy.submit(np.array([1, 2], dtype=np.int64))  # queued: waits for `other` or the max-wait timer
        assert busy.inflight
        assert mgr.expire_idle(time.monotonic() + 150) == 1  # `other` is idle; `busy` is never cut mid-step
        assert other.closed and not busy.closed
        await asyncio.wait_for(step, 10)
        assert not busy.inflight and busy.steps == 2
        assert mgr.expire_idle(time.monotonic() + 50) == 0  # finishing the step touched it: a fresh deadline
        assert mgr.expire_idle(time.monotonic() + 150) == 1 and busy.closed
        await s.model.scheduler.stop()

    asyncio.run(main())
    assert s.closed("idle") == 2 and s.pool.used == 0


def test_closed_sessions_do_not_pile_up_in_the_idle_heap(served):
    """Churn at a long idle timeout: the expiry heap stays proportional to the live sessions."""
    mgr = served(idle_timeout_s=3600, capacity=64).manager
    keep = [mgr.open("tiny") for _ in range(10)]
    peak = 0
    for _ in range(5000):
        mgr.close(mgr.open("tiny"), "client")
        peak = max(peak, len(mgr._deadlines))  # the heap has no public view: its size is what is under test
    assert all(not s.closed for s in keep)
    assert mgr.expire_idle(time.monotonic() + 7200) == 10  # the live ones still expire
    assert peak <= 2 * 11 + 1024 + 1 and len(mgr.sessions) == 0


# -- resume: the state a token carries must match the model's layout ----------------------------------------


def _lstm_state(s: Served, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(np.float32) for shape in s.pool.shapes)  # type: ignore[return-value]


@pytest.mark.parametrize("names", [("h0", "c0"), ()], ids=["version-2-names", "version-1-by-position"])
def test_a_resume_state_that_fits_the_model_is_written_into_the_new_slot(served, names):
    s = served()
    h, c = _lstm_state(s, 1)
    resume = ResumeState("tiny", s.model.manifest.sha256, 17, (h, c), names)
    session = s.manager.open("tiny", resume=resume)
    assert session.steps == 17
    got_h, got_c = s.pool.read(session.slot)
    np.testing.assert_array_equal(got_h, h)
    np.testing.assert_array_equal(got_c, c)
    state = session.state()  # what its next snapshot carries: every state by the model's names
    assert state.names == ("h0", "c0") and state.steps == 17
    np.testing.assert_array_equal(state.states[0], h)
    np.testing.assert_array_equal(state.states[1], c)


def test_a_version_1_token_resumes_an_lstm_session(served):
    s = served()
    h, c = _lstm_state(s, 2)
    key, now_ms = b"1" * 32, int(time.time() * 1000)
    token = v1_token("k1", key, model="tiny", sha256=s.model.manifest.sha256, steps=42, h=h, c=c, issued_ms=now_ms,
                     expires_ms=now_ms + 60_000)  # fmt: skip
    resume, _ = TokenCodec(TokenKeys({"k1": key}, "k1"), ttl_s=60).decode(
        token, model="tiny", model_sha256=s.model.manifest.sha256
    )
    assert resume.names == ()
    session = s.manager.open("tiny", resume=resume)
    assert session.steps == 42
    got_h, got_c = s.pool.read(session.slot)
    np.testing.assert_array_equal(got_h, h)
    np.testing.assert_array_equal(got_c, c)


def _misfits(h: np.ndarray, c: np.ndarray) -> dict[str, tuple[tuple[np.ndarray, ...], tuple[str, ...]]]:
    wide = np.zeros((h.shape[0], h.shape[1] + 1), np.float32)
    return {
        "names swapped": ((h, c), ("c0", "h0")),
        "other names": ((h, c), ("state", "cache")),
        "h of another shape": ((wide, c), ("h0", "c0")),
        "c of another shape": ((h, wide), ("h0", "c0")),
        "both of another shape, version 1": ((wide, wide), ()),
        "float16": ((h.astype(np.float16), c.astype(np.float16)), ("h0", "c0")),
        "one state": ((h,), ("h0",)),
        "one state, version 1": ((h,), ()),
        "three states": ((h, c, h), ("h0", "c0", "x0")),
        "a scalar state": ((h, np.zeros((), np.float32)), ("h0", "c0")),
    }


@pytest.mark.parametrize("case", list(_misfits(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32))))
def test_a_resume_state_with_the_wrong_names_or_shapes_is_failed_precondition(served, case):
    s = served(capacity=2)
    other = s.manager.open("tiny")  # a live neighbour, whose slot must stay as it is
    h, c = _lstm_state(s, 3)
    s.pool.write(other.slot, [h, c])
    states, names = _misfits(h, c)[case]
    resume = ResumeState("tiny", s.model.manifest.sha256, 5, states, names)
    with pytest.raises(FailedPrecondition, match="state layout does not match model 'tiny'") as e:
        s.manager.open("tiny", resume=resume)
    assert e.value.code.name == "FAILED_PRECONDITION"
    assert s.pool.used == 1 and len(s.manager.sessions) == 1  # the refused session's slot was freed
    got_h, got_c = s.pool.read(other.slot)
    np.testing.assert_array_equal(got_h, h)
    np.testing.assert_array_equal(got_c, c)
    fresh = s.manager.open("tiny")  # and a new session gets that slot, zeroed
    assert not any(a.any() for a in s.pool.read(fresh.slot))
