"""Sessions: a server-issued id, a state-pool slot, a step count, and an idle deadline.

Sessions know nothing of gRPC. Handlers reach them only through the
:class:`~cellserve.server.dataplane.DataPlane`: it opens one per stream (or OIP sequence), passing the
handler's ``notify`` callback through which the manager tells it about server-side events (idle expiry,
drain), and lends sessions outside the registry to stateless rows, so every slot borrow is counted.
Idle expiry uses a heap of deadlines checked lazily, so it costs O(expired), not O(sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cellserve.server.errors import FailedPrecondition, InvalidArgument, Unavailable
from cellserve.server.metrics import Metrics
from cellserve.server.models import LoadedModel, ModelRepository
from cellserve.server.resume_state import ResumeState
from cellserve.server.settings import Settings

if TYPE_CHECKING:
    from cellserve.server.tracing import SessionTrace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionClosed:
    """Event: the server closed the session (``reason``: idle, drain, error)."""

    reason: str
    message: str


@dataclass(frozen=True)
class DrainNotice:
    """Event: the server is draining; the session should leave (with a resume token) by ``deadline_ms``."""

    deadline_ms: int


SessionEvent = SessionClosed | DrainNotice
Notify = Callable[[SessionEvent], None]


class Session:
    """One client's recurrent state on one model. At most one step in flight.

    The session owns its fields: its step count, whether it is closed and why, and its slot, which
    it frees itself once it is closed and no step of it is in the engine (``released`` is then called).
    """

    def __init__(
        self,
        model: LoadedModel,
        idle_timeout_s: int,
        notify: Notify | None,
        released: Callable[[Session], None],
        resume: ResumeState | None = None,
    ) -> None:
        """A slot on ``model`` (RESOURCE_EXHAUSTED when the pool is full) holding zeros or ``resume``'s state."""
        self.id = secrets.token_hex(12)
        self.model = model
        self.idle_timeout_s = idle_timeout_s
        self.steps = 0
        self.closed = False
        self.close_reason = ""
        self.slot = model.pool.allocate(self)
        self._notify = notify
        self._released = released
        self.inflight = False  # a step of it is queued or in the engine (set here, and by session_groups)
        self.deadline = time.monotonic() + idle_timeout_s
        self.final_state: ResumeState | None = None  # kept when a drain closes it: the last resume token
        self.trace: SessionTrace | None = None  # its span, when tracing is on (set by the dataplane)
        if resume is not None:
            try:
                names = tuple(spec.input for spec in model.pool.specs)
                if resume.names and resume.names != names:
                    raise ValueError(f"it holds states {list(resume.names)}, the model keeps {list(names)}")
                model.pool.write(self.slot, resume.states)
            except ValueError as e:
                model.pool.release(self.slot, self)
                raise FailedPrecondition(
                    f"resume token's state layout does not match model {model.name!r}: {e}; resume on a server "
                    "that imported the model the same way"
                ) from e
            self.steps = resume.steps

    def touch(self) -> None:
        self.deadline = time.monotonic() + self.idle_timeout_s

    def submit(self, x: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Check ``x`` ([T, *frame]) and queue it; the future resolves to y [T, *out].

        If the caller stops waiting, a step the scheduler has not started is dropped; one it has started
        still finishes, and the slot stays in flight (never freed) until it has.
        """
        if self.closed or self.inflight:
            raise self.refusal()  # type: ignore[misc]
        try:
            x = self.model.check_input(x)
        except Exception as e:
            if self.trace is not None:  # a failed step is always traced
                self.trace.step_failed(self.id, e)
            raise
        self.inflight = True  # before enqueue: an inline scheduler may run (and finish) the step inside it
        try:
            return self.model.scheduler.enqueue(self.slot, x, self.step_done, self)
        except BaseException as e:  # refused (queue full, stopping): nothing is in flight
            self.inflight = False
            if self.trace is not None and isinstance(e, Exception):
                self.trace.step_failed(self.id, e)
            raise

    def refusal(self) -> Exception | None:
        """Why a step cannot be taken now (closed, or one already in flight), or None."""
        if self.closed:
            if self.close_reason == "drain":  # as every refusal of a draining server: go elsewhere
                return Unavailable(f"session {self.id} was closed by a drain; resume on another replica")
            return FailedPrecondition(f"session {self.id} is closed ({self.close_reason}); open a new one")
        if self.inflight:
            return FailedPrecondition(f"session {self.id} already has a step in flight; wait for its output")
        return None

    def step_done(self, steps: int) -> None:
        """The scheduler is done with this session's step (``steps`` taken; 0 if it never ran)."""
        self.inflight = False
        self.steps += steps  # before the slot can be released: a drain's final state includes it
        self.touch()
        if self.closed:  # closed while the step ran: the slot was kept for the engine until now
            self._release()

    def close(self, reason: str) -> bool:
        """Mark the session closed (False if it already was); its slot is freed once no step is in flight."""
        if self.closed:
            return False
        self.closed = True
        self.close_reason = reason
        if not self.inflight:  # else step_done releases when the engine is done with the slot
            self._release()
        return True

    def tell(self, event: SessionEvent) -> bool:
        """Hand ``event`` to the session's stream; False if nobody listens."""
        if self._notify is None:
            return False
        self._notify(event)
        return True

    def state(self) -> ResumeState:
        """Host copy of the current state (for snapshots and drain)."""
        if self.closed:
            raise FailedPrecondition(f"session {self.id} is closed; there is no state to snapshot")
        return self._read_state()

    def _read_state(self) -> ResumeState:
        pool = self.model.pool
        names = tuple(spec.input for spec in pool.specs)
        return ResumeState(self.model.name, self.model.manifest.sha256, self.steps, pool.read(self.slot), names)

    def _release(self) -> None:
        if self.close_reason == "drain":  # the grace ended: its stream still gets a current token
            self.final_state = self._read_state()
        self.model.pool.release(self.slot, self)
        self._released(self)
        if self.trace is not None:  # ends with the last step the engine ran for it, not at the close request
            self.trace.end(self.steps, self.close_reason)

    def log_fields(self) -> dict[str, str]:
        """What every log line inside this session carries: its id, and its trace's ids when it is traced."""
        fields = {"session_id": self.id}
        if self.trace is not None:
            fields.update(self.trace.log_fields())
        return fields


class SessionManager:
    """Opens, tracks, expires and closes sessions across all models."""

    def __init__(self, models: ModelRepository, settings: Settings, metrics: Metrics) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._deadlines: list[tuple[float, str]] = []
        self._reaper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()

    def grant_idle_timeout(self, requested_s: int) -> int:
        if requested_s < 0:
            raise InvalidArgument("idle_timeout_s must be >= 0")
        if requested_s == 0:
            return self.settings.idle_timeout_s
        return min(requested_s, self.settings.max_idle_timeout_s)

    def open(
        self,
        model_name: str,
        *,
        idle_timeout_s: int = 0,
        resume: ResumeState | None = None,
        notify: Notify | None = None,
    ) -> Session:
        """A new session on ``model_name`` (zero state, or ``resume``'s). Admission is decided here."""
        if not self.accepting:
            raise Unavailable("server is draining and accepts no new sessions; open on another replica")
        model = self.models.get(model_name)
        granted = self.grant_idle_timeout(idle_timeout_s)
        session = Session(model, granted, notify, self._slot_freed, resume)  # may raise ResourceExhausted
        self.sessions[session.id] = session
        self._empty.clear()
        heapq.heappush(self._deadlines, (session.deadline, session.id))
        self._wake.set()
        self.metrics.sessions_opened.labels(model=model.name).inc()
        self.metrics.sessions_active.labels(model=model.name).inc()
        self._update_slots(model)
        log.debug(
            "session opened", extra={"model": model.name, "resumed": resume is not None, "session_id": session.id}
        )
        return session

    def lend(self, model: LoadedModel, states: Sequence[np.ndarray | None]) -> Session:
        """A session outside the registry for one stateless row (no id in ``sessions``, no idle expiry, no open or
        close counted): its slot holds ``states`` (None: zeros) and counts in the slot gauges, as every borrow must.
        Hand it back with :meth:`give_back`."""
        resume = None
        if any(s is not None for s in states):
            pool = model.pool
            resume = ResumeState(
                model.name,
                model.manifest.sha256,
                0,
                tuple(
                    np.zeros(shape, dtype) if s is None else s.astype(dtype, copy=False)
                    for s, shape, dtype in zip(states, pool.shapes, pool.dtypes, strict=True)
                ),
            )
        session = Session(model, 0, None, self._slot_freed, resume)  # may raise ResourceExhausted
        self._update_slots(model)
        return session

    def give_back(self, session: Session) -> None:
        """End a lent session; its slot is freed (and the gauges updated) once no step of it is in the engine."""
        session.close("stateless")

    @property
    def count(self) -> int:
        """How many sessions are open."""
        return len(self.sessions)

    def refuse_opens(self) -> None:
        """From now on, opens (and stateless requests) are refused UNAVAILABLE: the server drains or stops."""
        self.accepting = False

    def close(self, session: Session, reason: str, *, notify: str | None = None) -> None:
        """Close ``session`` (idempotent). ``notify`` (a message) tells its stream why."""
        if not session.close(reason):
            return
        self.sessions.pop(session.id, None)
        if not self.sessions:
            self._empty.set()
        self._compact_deadlines()
        model = session.model.name
        self.metrics.sessions_active.labels(model=model).dec()
        self.metrics.sessions_closed.labels(model=model, reason=reason).inc()
        if log.isEnabledFor(logging.DEBUG):  # its own ids, not the task's: an OIP stream serves many sequences
            fields = {"model": model, "reason": reason, "steps": session.steps, **session.log_fields()}
            log.debug("session closed", extra=fields)
        if notify is not None:
            try:
                session.tell(SessionClosed(reason, notify))
            except Exception:  # one broken listener must not stop a close_all or the idle reaper
                log.exception("close notice failed", extra={"session": session.id})

    def begin_drain(self, deadline_ms: int) -> int:
        """Refuse new sessions and tell every live one to leave by ``deadline_ms``; returns how many."""
        self.refuse_opens()
        told = 0
        for session in list(self.sessions.values()):
            try:
                told += session.tell(DrainNotice(deadline_ms))
            except Exception:  # one broken listener must not stop the others from hearing the drain
                log.exception("drain notice failed", extra={"session": session.id})
        return told

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no session is open (True) or ``timeout`` seconds pass (False)."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close_all(self, reason: str, message: str) -> None:
        for session in list(self.sessions.values()):
            self.close(session, reason, notify=message)

    def _slot_freed(self, session: Session) -> None:
        self._update_slots(session.model)

    def _update_slots(self, model: LoadedModel) -> None:
        used = model.pool.used
        self.metrics.state_pool_slots.labels(model=model.name, state="used").set(used)
        self.metrics.state_pool_slots.labels(model=model.name, state="free").set(model.pool.capacity - used)

    # -- idle expiry ----------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="session-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    def _compact_deadlines(self) -> None:
        """Drop closed sessions' heap entries once they outnumber the live ones (amortised O(1) per close).

        Without this, every closed session's entry would wait for its idle deadline: memory would grow
        with open rate × idle timeout (1k opens/s at the 1 h maximum: millions of entries).
        """
        if len(self._deadlines) > 2 * len(self.sessions) + 1024:
            self._deadlines = [(s.deadline, sid) for sid, s in self.sessions.items()]
            heapq.heapify(self._deadlines)

    def expire_idle(self, now: float) -> int:
        """Close sessions whose idle deadline passed; returns how many. Touched sessions are re-queued."""
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, sid = heapq.heappop(self._deadlines)
            session = self.sessions.get(sid)
            if session is None:
                continue
            if session.deadline > now or session.inflight:
                heapq.heappush(self._deadlines, (max(session.deadline, now + 0.001), sid))
                continue
            self.close(
                session,
                "idle",
                notify=f"session idle for {session.idle_timeout_s}s (its idle timeout); state was freed",
            )
            expired += 1
        return expired

    async def _reap(self) -> None:
        while True:
            try:
                self.expire_idle(time.monotonic())
                delay = self._deadlines[0][0] - time.monotonic() if self._deadlines else 3600.0
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(delay, 0.001))
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - defensive: never let the reaper die
                log.exception("idle reaper error")
