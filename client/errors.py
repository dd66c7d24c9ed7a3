"""Typed client exceptions: one hierarchy, rooted at ``CellserveClientError``, each with its gRPC code.

::

    CellserveClientError            .code (grpc.StatusCode), .details (what was wrong, what is expected)
    ├── NotFoundError, UnavailableError, ResourceExhaustedError, ...   one class per status code
    ├── StepRejected                one step was refused; the session goes on, its state unchanged
    │   └── InvalidInputError       ... because its input is invalid, whether the client's own check
    │                               found it (nothing sent, .seq is None) or the server did
    │                               (also an InvalidArgumentError and a ValueError)
    └── SessionClosedError          the session is closed (.reason: client, idle, drain)

Two kinds of failure reach a client (see README "Errors"): a broken session or call ends the RPC
with a status (``from_rpc_error`` turns it into its class); a rejected *step* is answered inside the
stream and raises ``StepRejected`` for that step only.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import grpc


class CellserveClientError(Exception):
    """Base of every client error: ``code`` is the gRPC status, ``details`` the server's message."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = code or self.default_code
        self.details = details
        super().__init__(f"{self.code.name}: {details}")


class CancelledError(CellserveClientError):
    default_code = grpc.StatusCode.CANCELLED


class UnknownError(CellserveClientError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(CellserveClientError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(CellserveClientError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(CellserveClientError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(CellserveClientError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(CellserveClientError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(CellserveClientError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(CellserveClientError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(CellserveClientError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(CellserveClientError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(CellserveClientError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(CellserveClientError):
    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(CellserveClientError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(CellserveClientError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(CellserveClientError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class StepRejected(CellserveClientError):
    """One step was refused; the session goes on with its state unchanged.

    ``seq`` is the step's seq (None when the client refused it before sending). ``retryable``: the
    server's step queue was full (RESOURCE_EXHAUSTED); the same step may be sent again.
    """

    def __init__(self, seq: int | None, code: grpc.StatusCode, details: str) -> None:
        self.seq = seq
        super().__init__(details, code)

    @property
    def retryable(self) -> bool:
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED


class InvalidInputError(StepRejected, InvalidArgumentError, ValueError):
    """A step's input is invalid (dtype, shape, range, NaN): found by the client's check before sending
    (``seq`` None) or by the server (``seq`` set). Either way the session goes on, state unchanged."""

    def __init__(self, details: str, seq: int | None = None) -> None:
        super().__init__(seq, grpc.StatusCode.INVALID_ARGUMENT, details)


def step_rejected(seq: int, code: grpc.StatusCode, details: str) -> StepRejected:
    """The exception for an in-stream ``StepError``: an invalid input is an ``InvalidInputError``."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(details, seq)
    return StepRejected(seq, code, details)


class SessionClosedError(CellserveClientError):
    """The session is closed (by the client, idle expiry or drain); ``reason`` says which."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, details: str, code: grpc.StatusCode | None = None) -> None:
        self.reason = reason
        super().__init__(details, code)


_BY_CODE: dict[grpc.StatusCode, type[CellserveClientError]] = {
    cls.default_code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[CellserveClientError]:
    """The exception class for a status code (``UnknownError`` for codes without their own class)."""
    return _BY_CODE.get(code, UnknownError)


def status_code(number: int) -> grpc.StatusCode:
    """``grpc.StatusCode`` for a numeric code as carried in ``StepError.code``."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def from_rpc_error(err: grpc.RpcError) -> CellserveClientError:
    """Typed exception for a failed RPC (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details = err.details() if callable(getattr(err, "details", None)) else str(err)  # type: ignore[attr-defined]
    code = code or grpc.StatusCode.UNKNOWN
    return error_class(code)(details or "", code)


def log_lost(log: logging.Logger, what: str, session_id: str, error: CellserveClientError, **fields: str) -> None:
    """Log, once per session (the caller sees to it), why ``what`` (``"session <id>"``, a gateway key) cannot go on:
    the session and the reason in the text, which is all Python's last-resort handler prints, and as fields. An idle
    expiry is ordinary: INFO; anything else WARNING."""
    reason = error.reason if isinstance(error, SessionClosedError) else error.code.name.lower()
    level = logging.INFO if reason == "idle" else logging.WARNING
    fields.update(session=session_id, reason=reason, error=error.details)
    log.log(level, "%s cannot go on (%s): %s", what, reason, error.details, extra=fields)
