"""The SessionManager's idle expiry on a fake engine (no gRPC server, no onnxruntime): sessions expire at
their deadline and not before, touched or busy ones are re-queued, and closed sessions' heap entries are
compacted away."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from fake_engine import FakeEngine
from prometheus_client import CollectorRegistry

from cellserve.server.metrics import Metrics
from cellserve.server.models import ModelRepository
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
