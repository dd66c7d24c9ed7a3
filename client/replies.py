"""What the server's answers mean to a session core: the events a caller waits for, close reasons and
their status codes, and the error an open or a resume was answered with. No I/O, no state."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from cellserve.client.errors import (
    CellserveClientError,
    DataLossError,
    SessionClosedError,
    UnavailableError,
    UnknownError,
)
from cellserve.client.ops import Ended, Reply
from cellserve.v1 import cellserve_pb2 as pb

CLOSE_REASONS = {
    pb.CLOSE_REASON_UNSPECIFIED: "unspecified",
    pb.CLOSE_REASON_CLIENT: "client",
    pb.CLOSE_REASON_IDLE: "idle",
    pb.CLOSE_REASON_DRAIN: "drain",
}
CLOSED_CODES = {"idle": grpc.StatusCode.DEADLINE_EXCEEDED, "drain": grpc.StatusCode.UNAVAILABLE}


@dataclass(frozen=True)
class StepOutput:
    """One step's result: ``seq`` echoes the request, ``y`` is [T, O] float32."""

    seq: int
    y: np.ndarray


@dataclass(frozen=True)
class SnapshotTaken:
    """A snapshot's answer: an exact resume token of the state now."""

    token: bytes


CLOSED = object()  # what the receive loop returns when the session ended (closed by the client)


def is_opened(reply: Reply) -> bool:
    return isinstance(reply, pb.StreamResponse) and reply.WhichOneof("kind") == "opened"


def closed_error(session_id: str, reason: str | None, message: str) -> SessionClosedError:
    """What the caller gets for a session the server closed (``reason`` and its ``message``)."""
    reason = reason or "unspecified"
    text = f"session {session_id} is closed ({reason})" + (f": {message}" if message else "")
    return SessionClosedError(reason, text + "; open a new session to go on", CLOSED_CODES.get(reason))


def answer_error(reply: Reply, what: str) -> CellserveClientError:
    """The error an open was answered with (a status, or a first response that is not ``opened``)."""
    if isinstance(reply, Ended):
        return reply.error or UnavailableError(f"the server ended the stream before answering the {what}")
    kind = reply.WhichOneof("kind") if reply is not None else None
    return UnknownError(f"server answered the {what} with {kind!r}; expected 'opened'")


def resume_problem(reply: Reply, model_sha256: str, base_steps: int) -> CellserveClientError | None:
    """Why ``reply`` to a resume cannot continue this session (None if it can): another answer than
    ``opened``, another model file, or another step count than the token's ``base_steps``."""
    if not is_opened(reply):
        return answer_error(reply, "resume")
    assert isinstance(reply, pb.StreamResponse)
    o = reply.opened
    if o.model_sha256 != model_sha256:
        return DataLossError(
            f"it serves model {o.model!r} from another file (sha256 {o.model_sha256[:12]}…, this session's is "
            f"{model_sha256[:12]}…); every target must serve the same model file"
        )
    if o.steps != base_steps:
        return DataLossError(f"it resumed {o.steps} steps from a token of {base_steps}")
    return None
