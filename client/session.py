"""Synchronous session: the blocking I/O shell over ``SessionCore``.

The stream is grpc's blocking bidirectional call fed from a request queue; each operation the core
yields (see ``cellserve.client.ops``) is performed here and its result sent back. One thread uses a
session at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from cellserve.client.connection_pool import unanswered
from cellserve.client.core import SessionCore
from cellserve.client.errors import UnavailableError, from_rpc_error
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import Ended, Finish, Open, Pause, Reply, Routine, Send, leave, perform
from cellserve.client.replies import is_opened
from cellserve.client.session_base import SessionBase
from cellserve.client.trace_context import trace_metadata

T = TypeVar("T")
_END = object()  # half-closes a request stream


def _next(call: Any) -> Reply:
    try:
        return next(call)
    except StopIteration:
        return Ended()
    except grpc.RpcError as e:
        return Ended(from_rpc_error(e))


class _Deadline:
    """Cancels a call not answered within ``seconds`` (grpc's blocking streams take no per-read timeout)."""

    def __init__(self, seconds: float, call: Any) -> None:
        self.passed = False
        self._call = call
        self._lock = threading.Lock()
        self._answered = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        with self._lock:
            if self._answered:
                return
            self.passed = True
        self._call.cancel()

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._answered = True
        self._timer.cancel()


class Session(SessionBase):
    """A stateful session. ``y = s.step(x)``: x is [T] token ids (or one id) / [T, I] features; y is [T, O].

    Crash-safe by default: when its server drains or vanishes the session continues on the next target
    (or the same address again) from its latest checkpoint, replaying the steps since; the caller sees
    no error. Use it as a context manager: leaving the block (also by an exception) sends ``close``.
    """

    def __init__(self, core: SessionCore, stream: Callable[..., Any], metadata: tuple, open_timeout_s: float) -> None:
        super().__init__(core)
        self._stream = stream  # starts a Stream call on a target: Channels.stream (any of its connections)
        self._metadata = metadata + trace_metadata()  # the caller's span, as the session opens: its stream's parent
        self._open_timeout_s = open_timeout_s
        self._requests: queue.Queue[object] = queue.Queue()
        self._call: Any = None

    @classmethod
    def open(
        cls,
        core: SessionCore,
        stream: Callable[..., Any],
        info_for: Callable[[str, str], ModelInfo],
        metadata: tuple,
        open_timeout_s: float,
        start: int,
    ) -> Session:
        """Open on the first target from ``start`` that takes the session, and learn its model."""
        session = cls(core, stream, metadata, open_timeout_s)
        session._perform(core.open(start))
        try:
            session.info = info_for(core.model, core.target)
        except BaseException:
            session._abandon()
            raise
        return session

    def step(self, x: object) -> np.ndarray:
        """Run one chunk of T >= 1 steps; returns [T, O] float32. StepRejected leaves the session usable."""
        return self._perform(self._core.step(self._checked(x)))

    def snapshot(self) -> bytes:
        """An exact resume token of the current state (servers without resume answer UNIMPLEMENTED)."""
        return self._perform(self._core.snapshot())

    def close(self) -> None:
        """Send ``close``, wait for ``closed``, half-close. Idempotent."""
        self._perform(self._core.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        leave(self.close, self._abandon, exc)

    # -- performing the core's operations ---------------------------------------------------------

    def _perform(self, routine: Routine[T]) -> T:
        return perform(routine, self)

    def _open_stream(self, op: Open) -> Reply:
        requests: queue.Queue[object] = queue.Queue()
        requests.put(op.request)
        target = self._core.targets[op.index]
        call = self._stream(target, iter(requests.get, _END), metadata=self._metadata)
        with _Deadline(self._open_timeout_s, call) as deadline:  # a target that never answers is left
            reply = _next(call)
        if deadline.passed:  # the call was cancelled, even if its answer came in the same instant
            unanswered(call)  # its worker takes no new session for a while (a hung --workers process)
            reply = Ended(UnavailableError(f"{target} did not answer the open within {self._open_timeout_s:g} s"))
        if is_opened(reply):
            self._abandon()  # the stream it replaces (gone, or draining)
            self._requests, self._call = requests, call
        else:
            requests.put(_END)
            call.cancel()
        return reply

    def _send(self, op: Send) -> None:
        self._requests.put(op.request)

    def _receive(self, op: object) -> Reply:
        return _next(self._call)

    def _pause(self, op: Pause) -> None:
        time.sleep(op.seconds)  # backoff between resume attempts: this thread has nothing else to do

    def _finish(self, op: Finish) -> None:
        self._requests.put(_END)

    def _abandon(self) -> None:
        if self._call is not None:
            self._requests.put(_END)
            self._call.cancel()
