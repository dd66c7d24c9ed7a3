"""Triton-style sequences over cellserve sessions, scoped to one stream.

A sequence id (uint64 or string, from the request's ``sequence_id`` parameter) names a cellserve
session while its stream lives: ``sequence_start`` opens the session (zero state), each request
steps it, ``sequence_end`` closes it and frees its slot. A step for an id this stream has not
started is an error (even if another stream uses the id: ids never reach across streams), and so
is a start for an id already running. The session's idle timeout ends a forgotten sequence.
Requests of one sequence run strictly in arrival order; different sequences run concurrently,
so the scheduler batches them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from cellserve.server.errors import FailedPrecondition, InvalidArgument
from cellserve.server.models import LoadedModel
from cellserve.server.oip_tensors import ParamValue
from cellserve.server.sessions import Session, SessionClosed, SessionEvent, SessionManager

log = logging.getLogger(__name__)

SequenceKey = tuple[str, int | str]  # ("uint64", 42) or ("string", "user-7"): 42 and "42" differ
T = TypeVar("T")


@dataclass(frozen=True)
class SequenceFlags:
    """The sequence part of one request."""

    key: SequenceKey
    start: bool
    end: bool

    @property
    def label(self) -> str:
        return repr(self.key[1]) if self.key[0] == "string" else str(self.key[1])


def sequence_flags(params: Mapping[str, ParamValue]) -> SequenceFlags | None:
    """The request's sequence id and flags, or None for a request outside any sequence.

    As in Triton, an id of 0 or "" means "no sequence"; tritonclient sends integer ids as
    ``int64_param``, other clients as ``uint64_param``; both are accepted, negative ones are not.
    """
    sid = params.get("sequence_id")
    start, end = params.get("sequence_start", False), params.get("sequence_end", False)
    for name, flag in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(flag, bool):
            raise InvalidArgument(f"parameter {name} must be a bool_param, got {type(flag).__name__}")
    if sid is None or sid == 0 or sid == "":
        if start or end:
            raise InvalidArgument("sequence_start/sequence_end need a non-zero or non-empty sequence_id")
        return None
    if isinstance(sid, str):
        return SequenceFlags(("string", sid), start, end)
    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
        raise InvalidArgument(f"sequence_id must be a non-negative integer or a string, got {sid!r}")
    return SequenceFlags(("uint64", sid), start, end)


@dataclass(frozen=True)
class StepResult:
    y: np.ndarray  # [T, O]
    h: np.ndarray | None  # [L, H] after the step, when asked for
    c: np.ndarray | None


class StreamSequences:
    """The sequences one stream has started (id → session), and their in-order execution."""

    def __init__(self, sessions: SessionManager, on_server_end: Callable[[SequenceFlags, str], None]) -> None:
        self._sessions = sessions
        self._live: dict[SequenceKey, Session] = {}
        self._tails: dict[SequenceKey, asyncio.Future[object]] = {}
        self._on_server_end = on_server_end

    def __len__(self) -> int:
        return len(self._live)

    async def in_order(self, key: SequenceKey, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` after every earlier request of the same sequence has finished."""
        previous = self._tails.get(key)
        mine: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its own business
            return await work()
        finally:
            mine.set_result(None)
            if self._tails.get(key) is mine:
                del self._tails[key]

    async def step(self, model: LoadedModel, flags: SequenceFlags, x: np.ndarray, *, want_state: bool) -> StepResult:
        """One request of a sequence: ``x`` is one row ([T] or [T, I]). Call inside :meth:`in_order`."""
        session = self._live.get(flags.key)
        if session is not None and session.closed:  # ended by the server (idle, drain) since
            del self._live[flags.key]
            session = None
        if flags.start:
            if session is not None:
                raise FailedPrecondition(
                    f"sequence {flags.label} is already active on this stream; end it (sequence_end) before "
                    "starting it again"
                )
            # Check the input before opening, so a bad first request leaves no sequence behind.
            x = model.check_input(x, self._sessions.settings.max_chunk_steps)
            session = self._sessions.open(model.name, notify=lambda event, f=flags: self._server_ended(f, event))
            self._live[flags.key] = session
        elif session is None:
            raise FailedPrecondition(
                f"inference request for sequence {flags.label} to model '{model.name}' must specify the START "
                f"flag on the first request of the sequence (no sequence {flags.label} is active on this stream; "
                "sequence ids are scoped to the stream that started them)"
            )
        elif session.model is not model:
            raise InvalidArgument(f"sequence {flags.label} runs on model '{session.model.name}', not '{model.name}'")
        try:
            y = await session.step(x)
        except BaseException:
            if flags.start:  # a failed start leaves no sequence
                self._end(flags.key, session, "error")
            raise
        h = c = None
        if want_state:
            state = session.state()
            h, c = state.h, state.c
        if flags.end:
            self._end(flags.key, session, "client")
        return StepResult(y, h, c)

    def _end(self, key: SequenceKey, session: Session, reason: str) -> None:
        if self._live.get(key) is session:
            del self._live[key]
        self._sessions.close(session, reason)

    def _server_ended(self, flags: SequenceFlags, event: SessionEvent) -> None:
        if not isinstance(event, SessionClosed):
            # A drain notice: the Triton protocol cannot hand state over, so an OIP sequence keeps
            # running until it ends or the grace period closes it (then it hears SessionClosed).
            return
        session = self._live.get(flags.key)
        if session is not None and session.closed:
            del self._live[flags.key]
        self._on_server_end(flags, event.message)

    def close_all(self, reason: str) -> None:
        """Stream over: close every sequence it still holds."""
        for key, session in list(self._live.items()):
            self._end(key, session, reason)
