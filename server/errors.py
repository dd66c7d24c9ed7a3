"""Domain errors, each carrying its gRPC status code, and the one place that maps them to gRPC.

Two kinds (DESIGN §4): a bad *step* is answered in the stream by a ``StepError`` message and the
session goes on; a broken *session or protocol* ends the stream with the error's status.
"""

from __future__ import annotations

import logging
from typing import ClassVar, NoReturn

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


class DeadlineExceeded(CellserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CellserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


INTERNAL_MESSAGE = "internal server error; the server log has the details"


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (code, message). Only domain errors reveal their message."""
    if isinstance(err, CellserveError):
        return err.code, err.message
    log.error("unexpected error", exc_info=err)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


async def abort(context: grpc.aio.ServicerContext, err: BaseException) -> NoReturn:
    """End the RPC with the status that ``err`` maps to."""
    code, message = to_status(err)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
