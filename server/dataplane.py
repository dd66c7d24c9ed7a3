"""The dataplane: the one interface under every API surface (native ``Stream`` and ``Generate``, OIP, and the
coming many-sessions-per-message gateway).

Handlers translate protobuf ↔ domain objects and call this; none of them reaches into the
:class:`~cellserve.server.sessions.SessionManager`, the model repository or the app. So every API gets the
same admission, batching, slot accounting, idle expiry, drain and resume tokens, by construction rather
than by each handler remembering to (MLServer's ``DataPlane``, KServe's ``data_plane``).

The operations:

- **models**: :meth:`DataPlane.model` (by name, "" for the default), :meth:`DataPlane.models`,
  :attr:`DataPlane.accepting` (False once the server drains or stops);
- **sessions**: :meth:`DataPlane.open` → a :class:`~cellserve.server.sessions.Session` handle,
  :meth:`DataPlane.step` (the scheduler's future, nothing wrapped around it: the per-message hot path),
  :meth:`DataPlane.step_many` (many sessions' steps as one scheduler entry, entries failing alone: the gateway's),
  :meth:`DataPlane.state` / :meth:`DataPlane.snapshot` / :meth:`DataPlane.parting_snapshot` (state, signed
  resume tokens), :meth:`DataPlane.close`;
- **generation**: :meth:`DataPlane.generate` (a token model's sampling loop over one session);
- **stateless**: :meth:`DataPlane.infer` (x and explicit states → y and next states), whose rows borrow pool
  slots as sessions do, so the slot gauges and the scheduler see them.

A session handle's public face is ``id``, ``model``, ``idle_timeout_s``, ``steps``, ``closed`` and
``inflight``; everything else goes through the dataplane.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cellserve.server.batching import GroupResult
from cellserve.server.errors import Unavailable
from cellserve.server.models import LoadedModel, ModelRepository
from cellserve.server.resume_state import ResumeState
from cellserve.server.resume_token import TokenCodec
from cellserve.server.session_groups import choose, submit_many
from cellserve.server.sessions import Notify, Session, SessionManager
from cellserve.server.settings import Settings

if TYPE_CHECKING:
    from cellserve.server.tracing import Tracing

DRAINING = "server is draining and accepts no new requests; retry on another replica"


@dataclass(frozen=True)
class Steps:
    """What :meth:`DataPlane.step_many` returns: y ``[N, T, *out]`` in the request's row order (zero rows where an entry
    failed; None when every entry did) and each failed entry's error by its index."""

    y: np.ndarray | None
    errors: dict[int, Exception]


@dataclass(frozen=True)
class Snapshot:
    """A session's state as a signed resume token, with the step count it holds and when it expires."""

    token: bytes
    steps: int
    expires_at_ms: int


class DataPlane:
    """Open, step, snapshot and close sessions, and run stateless rows, on the server's loaded models."""

    def __init__(
        self,
        models: ModelRepository,
        sessions: SessionManager,
        tokens: TokenCodec,
        settings: Settings,
        tracing: Tracing | None = None,
    ) -> None:
        """``tracing``: a span per session (None: tracing is off, and nothing is done for it)."""
        self._models = models
        self._sessions = sessions
        self._tokens = tokens
        self._settings = settings
        self._tracing = tracing

    # -- models -----------------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The server's settings (read-only): the limits handlers enforce at the edge (timeouts, sizes)."""
        return self._settings

    @property
    def tracing(self) -> bool:
        """Whether sessions are traced: only then is a caller's ``traceparent`` worth reading from its metadata."""
        return self._tracing is not None

    @property
    def accepting(self) -> bool:
        """False once the server drains or stops: new sessions and stateless requests are refused."""
        return self._sessions.accepting

    def model(self, name: str, *, or_default: bool = False) -> LoadedModel:
        """The model ``name``, NOT_FOUND listing the loaded ones; ``or_default``: "" names the first model served
        (a session's open and Generate; ModelInfo and OIP name their model)."""
        return self._models.get((name or self._models.default_name()) if or_default else name)

    def models(self) -> list[LoadedModel]:
        """Every served model, in the order given at start-up."""
        return list(self._models)

    # -- sessions ---------------------------------------------------------------------------------

    def open(
        self,
        model: str = "",
        *,
        idle_timeout_s: int = 0,
        resume_token: bytes = b"",
        resume: ResumeState | None = None,
        notify: Notify | None = None,
        trace_carrier: Mapping[str, str] | None = None,
    ) -> Session:
        """A new session on ``model`` ("" for the default): zero state, or a resume token's (checked against the
        model and its file), or ``resume``'s. ``notify`` hears the server's events for it (idle close, drain).
        ``trace_carrier``: the caller's W3C ``traceparent``/``tracestate`` (its gRPC metadata); with tracing on, the
        session's span continues the caller's trace.

        Refused: UNAVAILABLE while draining, RESOURCE_EXHAUSTED at capacity; a bad token fails as the codec says.
        """
        name = model or self._models.default_name()
        if resume_token:
            loaded = self._models.get(name)
            resume, _ = self._tokens.decode(resume_token, model=name, model_sha256=loaded.manifest.sha256)
        session = self._sessions.open(name, idle_timeout_s=idle_timeout_s, resume=resume, notify=notify)
        if self._tracing is not None:
            session.trace = self._tracing.session(
                session.model.name, session.id, resumed=resume is not None, carrier=trace_carrier
            )
        return session

    def log_fields(self, session: Session) -> dict[str, str]:
        """The fields every log line inside ``session`` carries: ``session_id``, and ``trace_id``/``span_id`` when it
        is traced (bind them with :func:`cellserve.server.logs.bind_log_fields`)."""
        return session.log_fields()

    def step(self, session: Session, x: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue one step ``x`` ([T, *frame]) of ``session``; the scheduler's own future resolves to y [T, *out].

        Returned as is (no coroutine or task around it): a native stream's message costs one future.
        """
        return session.submit(x)

    async def step_many(
        self, sessions: Sequence[Session | None], x: np.ndarray, errors: dict[int, Exception] | None = None
    ) -> Steps:
        """One step for each of ``sessions`` of one model: row i of ``x`` ([N, T, *frame]) for ``sessions[i]`` (None:
        an entry ``errors`` already explains). The rows go to the scheduler as one entry (several when N passes
        ``max_batch`` or ``max_batch_steps``), without a future or task per row, merging with other steps.

        A bad row, a closed or busy session, a session of another model or the same session twice fails alone,
        in the result's ``errors``; the others run. A problem of the whole message raises InvalidArgument.
        """
        errors = {} if errors is None else errors
        model = next((s.model for s in sessions if s is not None), None)
        if model is None:
            return Steps(None, errors)
        for i, e in model.check_rows(x).items():
            errors.setdefault(i, e)
        rows = choose(sessions, model, errors)
        chosen: list[Session] = [sessions[i] for i in rows]  # type: ignore[misc]
        if self._tracing is not None:  # a step refused before the engine is always traced
            for i, e in errors.items():
                traced = sessions[i]
                if traced is not None and traced.trace is not None:
                    traced.trace.step_failed(traced.id, e)
        if not chosen:
            return Steps(None, errors)
        xs = x if len(rows) == len(x) else x[rows]
        scheduler = model.scheduler
        per_call = max(1, min(scheduler.max_batch, scheduler.max_batch_steps // x.shape[1]))
        parts: list[tuple[int, asyncio.Future[GroupResult] | BaseException]] = []
        for start in range(0, len(chosen), per_call):
            try:
                part: asyncio.Future[GroupResult] | BaseException = submit_many(
                    model, chosen[start : start + per_call], xs[start : start + per_call]
                )
            except Exception as e:  # the queue is full, the model stopping: these rows fail, the others run
                part = e
            parts.append((start, part))
        try:
            results = [(start, part if isinstance(part, BaseException) else await part) for start, part in parts]
        except asyncio.CancelledError:
            for _, part in parts:
                if isinstance(part, asyncio.Future):
                    part.cancel()
            raise
        if len(results) == 1 and len(chosen) == len(x) and isinstance(results[0][1], GroupResult):
            only = results[0][1]
            if not only.failed:  # the common case: every row ran, in one scheduler entry
                return Steps(only.y, errors)
        y: np.ndarray | None = None
        for start, result in results:
            count = min(per_call, len(chosen) - start)
            if isinstance(result, BaseException) or result.y is None:
                for k in range(count):
                    errors[rows[start + k]] = result if isinstance(result, BaseException) else result.failed[k]
                continue
            if y is None:
                y = np.zeros((len(x), *result.y.shape[1:]), result.y.dtype)
            y[rows[start : start + count]] = result.y
            for k, e in result.failed.items():
                errors[rows[start + k]] = e
        return Steps(y, errors)

    def state(self, session: Session) -> ResumeState:
        """Host copy of ``session``'s state; for a session a drain closed, the state it was closed with."""
        if session.closed and session.final_state is not None:
            return session.final_state
        return session.state()

    def snapshot(self, session: Session) -> Snapshot:
        """``session``'s current state as a signed resume token (FAILED_PRECONDITION once it is closed)."""
        token, expires = self._tokens.encode(session.state())
        return Snapshot(token, session.steps, expires)

    def parting_snapshot(self, session: Session) -> Snapshot | None:
        """The token a drain kept when it closed ``session`` (its stream still owes it to the client), else None."""
        state = session.final_state
        if state is None:
            return None
        token, expires = self._tokens.encode(state)
        return Snapshot(token, state.steps, expires)

    def close(self, session: Session, reason: str = "client") -> None:
        """Close ``session`` (idempotent); its slot is freed once no step of it is in the engine."""
        self._sessions.close(session, reason)

    async def generate(
        self,
        model: LoadedModel,
        prompt: np.ndarray,
        max_tokens: int,
        next_token: Callable[[np.ndarray], int],
        *,
        trace_carrier: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[int, None]:
        """Token ids sampled one by one after ``prompt`` ([T] ids, fed in chunks of ``max_steps``), each fed back as
        the next step; ``next_token`` picks a token from one step's logits [V]. One session, closed when the
        iterator ends or is closed (use ``contextlib.aclosing``: a caller gone mid-stream frees the slot at once).
        ``trace_carrier``: the caller's W3C trace context, as for :meth:`open`.
        """
        session = self.open(model.name, trace_carrier=trace_carrier)
        try:
            chunk = model.max_steps
            for start in range(0, len(prompt), chunk):
                y = await self.step(session, prompt[start : start + chunk])  # [T, V]
            for i in range(max_tokens):
                token = next_token(y[-1])
                yield token
                if i + 1 < max_tokens:
                    y = await self.step(session, np.array([token], dtype=np.int64))
        finally:
            self.close(session, "client")

    # -- stateless --------------------------------------------------------------------------------

    async def infer(
        self, model: str, x: np.ndarray, states: Sequence[np.ndarray | None]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """x ``[B, T, *frame]`` from explicit states (each ``[B, *state]``, or None for zeros) → y ``[B, T, *out]``
        and each next state ``[B, *state]``.

        Each row borrows a pool slot for one step, as a session outside the registry would: the same admission,
        batching and slot gauges as sessions. A cancelled caller drops the rows not yet run; every slot is freed
        once the engine is done with it.
        """
        if not self.accepting:
            raise Unavailable(DRAINING)
        loaded = self.model(model)
        rows = [loaded.check_input(x[b]) for b in range(x.shape[0])]  # InvalidArgument before any slot
        lent: list[Session] = []
        try:
            for b in range(len(rows)):  # RESOURCE_EXHAUSTED when the pool is full
                lent.append(self._sessions.lend(loaded, [None if s is None else s[b] for s in states]))
            futures: list[asyncio.Future[np.ndarray]] = []
            refused: BaseException | None = None
            for session, row in zip(lent, rows, strict=True):
                try:
                    futures.append(session.submit(row))
                except Exception as e:  # queue full: the rows already queued still run before their slots are freed
                    refused = e
                    break
            results = await asyncio.gather(*futures, return_exceptions=True)
            ys: list[np.ndarray] = []
            for r in results:
                if isinstance(r, BaseException):
                    raise r
                ys.append(r)
            if refused is not None:
                raise refused
            next_states = [session.state().states for session in lent]
        finally:
            for session in lent:
                self._sessions.give_back(session)
        y = np.stack(ys)  # [B, T, *out]
        return y, [np.stack(per_state) for per_state in zip(*next_states, strict=True)]  # each [B, *state]
