"""The session protocol without I/O: request builders and what each response means to a session.

Both the sync ``Session`` and the ``AsyncSession`` keep one ``SessionState`` and feed it every
response. It remembers the latest resume token (from ``snapshot`` or ``draining``) and the targets
the client may use, so transparent resume on another replica is a small addition on top.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from cellserve.client.errors import (
    CellserveClientError,
    DataLossError,
    SessionClosedError,
    StepRejected,
    UnavailableError,
    UnknownError,
    status_code,
)
from cellserve.client.tensors import to_numpy, to_proto
from cellserve.v1 import cellserve_pb2 as pb

CLOSE_REASONS = {
    pb.CLOSE_REASON_UNSPECIFIED: "unspecified",
    pb.CLOSE_REASON_CLIENT: "client",
    pb.CLOSE_REASON_IDLE: "idle",
    pb.CLOSE_REASON_DRAIN: "drain",
}
# The status a step on a session closed for this reason raises with.
CLOSED_CODES = {
    "idle": grpc.StatusCode.DEADLINE_EXCEEDED,
    "drain": grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True)
class StepOutput:
    """One step's result: ``seq`` echoes the request, ``y`` is [T, O] float32."""

    seq: int
    y: np.ndarray


@dataclass
class SessionState:
    """Client-side record of one session."""

    targets: tuple[str, ...]
    model: str = ""
    session_id: str = ""
    model_sha256: str = ""
    idle_timeout_s: int = 0
    steps: int = 0
    next_seq: int = 0
    pending: dict[int, int] = field(default_factory=dict)  # seq -> T of steps sent, not yet answered
    resume_token: bytes = b""  # latest token from snapshot or draining
    resume_deadline_unix_ms: int = 0
    draining: bool = False
    closed_reason: str | None = None
    closed_message: str = ""

    # -- requests ---------------------------------------------------------------------------------

    def open_request(self, model: str, idle_timeout_s: int = 0, resume_token: bytes = b"") -> pb.StreamRequest:
        if resume_token:  # current until the next step: a resumed session can move again at once
            self.resume_token = resume_token
        return pb.StreamRequest(open=pb.Open(model=model, idle_timeout_s=idle_timeout_s, resume_token=resume_token))

    def step_request(self, x: np.ndarray) -> pb.StreamRequest:
        """A Step for an already checked input; records it as pending."""
        if self.closed_reason is not None:
            raise self.closed_error()
        seq = self.next_seq
        self.next_seq += 1
        self.pending[seq] = int(x.shape[0])
        return pb.StreamRequest(step=pb.Step(seq=seq, input=to_proto(x)))

    @staticmethod
    def close_request() -> pb.StreamRequest:
        return pb.StreamRequest(close=pb.Close())

    @staticmethod
    def snapshot_request() -> pb.StreamRequest:
        return pb.StreamRequest(snapshot=pb.Snapshot())

    # -- responses --------------------------------------------------------------------------------

    def on_opened(self, resp: pb.StreamResponse) -> None:
        if resp.WhichOneof("kind") != "opened":
            raise UnknownError(f"server answered open with {resp.WhichOneof('kind')!r}, expected 'opened'")
        o = resp.opened
        self.session_id, self.model, self.model_sha256 = o.session_id, o.model, o.model_sha256
        self.idle_timeout_s, self.steps = o.idle_timeout_s, o.steps

    def on_response(self, resp: pb.StreamResponse) -> StepOutput | None:
        """Apply one response. Returns a StepOutput for an output; None for bookkeeping messages
        (draining, snapshot, closed). Raises StepRejected for an in-stream step error."""
        kind = resp.WhichOneof("kind")
        if kind == "output":
            seq = resp.output.seq
            t = self.pending.pop(seq, None)
            if t is None:
                raise UnknownError(f"server sent output for seq {seq}, which has no step pending")
            y = to_numpy(resp.output.output)
            self.steps += t
            return StepOutput(seq, y)
        if kind == "error":
            e = resp.error
            self.pending.pop(e.seq, None)
            raise StepRejected(e.seq, status_code(e.code), e.message)
        if kind == "draining":
            self.draining = True
            self.resume_token = resp.draining.resume_token
            self.resume_deadline_unix_ms = resp.draining.deadline_unix_ms
            return None
        if kind == "snapshot":
            self.resume_token = resp.snapshot.token
            return None
        if kind == "closed":
            self.closed_reason = CLOSE_REASONS.get(resp.closed.reason, "unspecified")
            self.closed_message = resp.closed.message
            self.steps = resp.closed.steps
            return None
        raise UnknownError(f"unexpected response {kind!r} in an open session")

    def closed_error(self) -> SessionClosedError:
        reason = self.closed_reason or "unspecified"
        msg = f"session {self.session_id} is closed ({reason})" + (
            f": {self.closed_message}" if self.closed_message else ""
        )
        return SessionClosedError(reason, msg, CLOSED_CODES.get(reason))


class ResumeAttempt:
    """One resume of a session on the other targets, without I/O (the sync and async sessions open).

    ``for index in attempt.candidates():`` try opening there; ``failed`` on an error; after an open,
    ``stale()`` says whether the token lost or repeated steps; ``give_up()`` is the error when none took it.
    """

    def __init__(self, state: SessionState, current: int) -> None:
        self.state = state
        self.current = current
        self.answered = state.steps  # every step before the one being retried
        self.errors: list[str] = []
        self.unavailable = len(state.targets) == 1  # no other target at all counts as unavailable

    def candidates(self) -> Iterator[int]:
        n = len(self.state.targets)
        for k in range(1, n):
            self.state.closed_reason, self.state.draining = None, False
            yield (self.current + k) % n

    def failed(self, index: int, error: CellserveClientError) -> None:
        self.errors.append(f"{self.state.targets[index]}: {error}")
        self.unavailable = self.unavailable or isinstance(error, UnavailableError)

    def stale(self, index: int) -> DataLossError | None:
        if self.state.steps == self.answered:
            return None
        return DataLossError(
            f"the resume token holds the state after {self.state.steps} steps but this session had "
            f"{self.answered} answered; it cannot continue on {self.state.targets[index]} without losing "
            "or repeating steps (take a snapshot after the last step to move a session safely)"
        )

    def give_up(self) -> CellserveClientError:
        message = f"no other server of {self.state.targets} took the session: " + "; ".join(self.errors)
        if not self.unavailable:  # every other server refused the token itself: retrying cannot help
            return DataLossError(message)
        return UnavailableError(message)
