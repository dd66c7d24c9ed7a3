"""A gateway message's sessions as one scheduler entry: which of them may step (:func:`choose`), and queueing
their rows with one future (:func:`submit_many`), the per-row bookkeeping of ``Session.submit`` and
``Session.step_done`` done in one loop each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cellserve.server.errors import InvalidArgument
from cellserve.server.models import LoadedModel
from cellserve.server.sessions import Session

if TYPE_CHECKING:
    from cellserve.server.batching import GroupResult


def choose(sessions: Sequence[Session | None], model: LoadedModel, errors: dict[int, Exception]) -> list[int]:
    """The indices of ``sessions`` that may step now (open sessions of ``model``, none in flight, each once), in
    order; each other one gets its reason in ``errors`` (an index already there, or None, is skipped)."""
    rows = [
        i
        for i, s in enumerate(sessions)
        if s is not None and not s.closed and not s.inflight and s.model is model and i not in errors
    ]
    if len(rows) == len(sessions) and len(set(sessions)) == len(rows):
        return rows  # the common case: every entry may step
    rows, seen = [], set()
    for i, session in enumerate(sessions):
        if session is None or i in errors:
            continue
        refused = session.refusal()
        if refused is None and session.model is not model:
            refused = InvalidArgument(
                f"session {session.id} is on model {session.model.name!r}; one message steps sessions of one "
                f"model ({model.name!r} here)"
            )
        if refused is None and id(session) in seen:
            refused = InvalidArgument(f"session {session.id} appears twice; step a session once per message")
        if refused is not None:
            errors[i] = refused
            continue
        seen.add(id(session))
        rows.append(i)
    return rows


def submit_many(model: LoadedModel, sessions: Sequence[Session], x: np.ndarray) -> asyncio.Future[GroupResult]:
    """Queue one step for each of ``sessions`` (chosen by :func:`choose`; row i of ``x`` [n, T, *frame], already
    checked, for ``sessions[i]``): one future for all, as one scheduler entry. Each session is in flight until the
    engine is done with its slot; a row that failed alone takes no step."""
    for session in sessions:
        session.inflight = True

    def finished(steps: int, failed: Mapping[int, Exception]) -> None:
        now = time.monotonic()
        for i, session in enumerate(sessions):  # Session.step_done for each, inlined: this runs per row
            ran = 0 if failed and i in failed else steps
            if session.closed:  # closed while the step ran: its slot is freed now
                session.step_done(ran)
                continue
            session.inflight = False
            session.steps += ran
            session.deadline = now + session.idle_timeout_s

    slots = np.array([s.slot for s in sessions], np.int64)
    try:
        return model.scheduler.enqueue_many(slots, x, finished, sessions)
    except BaseException:  # refused (queue full, stopping): nothing is in flight
        for session in sessions:
            session.inflight = False
        raise
