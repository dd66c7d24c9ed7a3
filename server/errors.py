"""Domain errors, each carrying its gRPC status code, and the one place that maps them to gRPC.

Two kinds: a bad *step* is answered in the stream by a ``StepError`` message and the
session goes on; a broken *session or protocol* ends the stream with the error's status.

Every servicer method is wrapped by :func:`rpc` and every servicer holds an :class:`ErrorBoundary`:
whatever a handler raises is mapped to a status, counted in ``cellserve_errors_total{code}`` and
ends the RPC there — native Stream and Generate, OIP, unary and streaming alike.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, NoReturn, Protocol, TypeVar

import grpc

log = logging.getLogger(__name__)


class CellserveError(Exception):
    """Base of every error a client can cause; ``message`` says what was wrong and what is expected."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CellserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CellserveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(CellserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(CellserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(CellserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(CellserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(CellserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(CellserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StepFailed(CellserveError):
    """The engine failed on this one step (found by retrying its batch in halves; the other steps ran). The step
    was not applied: its session's state is unchanged and it may step again. A bad step, answered in-stream."""

    code = grpc.StatusCode.INTERNAL


class StepOutOfMemory(StepFailed):
    """The engine ran out of memory on this one step (e.g. a long chunk); shorter chunks may fit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class EngineUnavailable(RuntimeError):
    """Not a client's error: the engine cannot run here (a missing provider or library). Start-up fails in one line."""


INTERNAL_MESSAGE = "internal server error; the server log has the details"


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (code, message). Only domain errors reveal their message."""
    if isinstance(err, CellserveError):
        return err.code, err.message
    log.error("unexpected error", exc_info=err)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class BadRequest:
    """What a request deserializer returns for bytes it will not parse (see ``interceptors``).

    Handlers wrapped by :func:`rpc` raise ``error`` for a unary request; streaming handlers check
    each request they read (``type(request) is BadRequest``), so no wrapper sits on the stream.
    """

    __slots__ = ("error",)

    def __init__(self, error: CellserveError) -> None:
        self.error = error


def checked(request: Any) -> Any:
    """``request``, unless the request guard marked it bad: then its precise error is raised. (The two
    stream handlers make the same test inline on their per-message path.)"""
    if type(request) is BadRequest:
        raise request.error
    return request


class _Counter(Protocol):
    def labels(self, *, code: str) -> Any: ...


class ErrorBoundary:
    """Maps an exception to its status, counts it by code, and ends the RPC with it."""

    def __init__(self, errors: _Counter) -> None:
        self._errors = errors
        self._by_code: dict[grpc.StatusCode, Any] = {}  # a code's series appears when first counted

    def count(self, code: grpc.StatusCode) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._errors.labels(code=code.name)
        counter.inc()

    def status(self, err: BaseException) -> tuple[grpc.StatusCode, str]:
        """(code, message) for ``err``, counted: for errors answered inside a stream."""
        code, message = to_status(err)
        self.count(code)
        return code, message

    async def abort(self, context: grpc.aio.ServicerContext, err: BaseException) -> NoReturn:
        code, message = self.status(err)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


class Servicer(Protocol):
    errors: ErrorBoundary


S = TypeVar("S", bound=Servicer)
Handler = Callable[[S, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def rpc(method: Handler[S]) -> Handler[S]:
    """Wrap a servicer coroutine (unary, or streaming with ``context.read/write``) in the error boundary.

    grpc's own control-flow errors (an abort already sent, a call that ended) pass through untouched;
    so does cancellation. Request-guard interceptors see ``checks_requests`` and leave such handlers unwrapped.
    """

    @functools.wraps(method)
    async def guarded(self: S, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, checked(request), context)
        except grpc.aio.BaseError:
            raise
        except Exception as e:
            await self.errors.abort(context, e)

    guarded.checks_requests = True  # type: ignore[attr-defined]
    return guarded
