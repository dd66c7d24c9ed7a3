"""What a gateway's core asks its I/O shell to do, and what it keeps per session, per stream and per request.

A gateway holds many sessions of one model over a few ``Multiplex`` streams (its *lanes*). Like a single
session (``cellserve.client.ops``), its calls are generator routines over operations that the sync
``Gateway`` performs blocking and the ``AsyncGateway`` awaiting; neither decides anything:

===========  ================================================================  ===========================
operation    the shell                                                          result
===========  ================================================================  ===========================
StartLane    starts a ``Multiplex`` call on ``target`` (a connection of that     None
             address's pool) and reads its responses into the lane's inbox
SendOn       writes ``request`` on the lane (nothing if the lane is gone: the     None
             next ReceiveOn says how it ended)
ReceiveOn    the lane's next response; past ``timeout_s`` the call is            a response, or ``Ended``
             cancelled and the answer is ``Ended(UnavailableError)``
PollOn       the lane's next response if one is already in                      a response, ``Ended``, None
EndLane      half-closes the lane (``graceful``: the server ends the stream     None
             once it has answered) or cancels it; forgets it either way
Describe     the model's description (``ModelInfo``), asked of ``target``       ``ModelInfo``
Pause        sleeps ``seconds`` (backoff between resume rounds)                  None
===========  ================================================================  ===========================
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np

from cellserve.client.errors import CellserveClientError
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import Ended, Pause
from cellserve.v1 import cellserve_pb2 as pb

if TYPE_CHECKING:
    from cellserve.client.recovery import Recovery

# The server's default ``max_sessions_per_stream``: a gateway puts at most this many sessions on one stream.
DEFAULT_SESSIONS_PER_STREAM = 256


@dataclass(frozen=True)
class StartLane:
    handler: ClassVar[str] = "_start_lane"
    lane: int
    target: str


@dataclass(frozen=True)
class SendOn:
    handler: ClassVar[str] = "_send_on"
    lane: int
    request: pb.MultiplexRequest


@dataclass(frozen=True)
class ReceiveOn:
    handler: ClassVar[str] = "_receive_on"
    lane: int
    timeout_s: float | None = None  # None: as long as it takes (keepalive notices a dead peer)


@dataclass(frozen=True)
class PollOn:
    handler: ClassVar[str] = "_poll_on"
    lane: int


@dataclass(frozen=True)
class EndLane:
    handler: ClassVar[str] = "_end_lane"
    lane: int
    graceful: bool = False


@dataclass(frozen=True)
class Describe:
    handler: ClassVar[str] = "_describe"
    model: str
    target: str


GatewayOp = StartLane | SendOn | ReceiveOn | PollOn | EndLane | Describe | Pause
GatewayReply = pb.MultiplexResponse | Ended | ModelInfo | None
T = TypeVar("T")
GatewayRoutine = Generator[GatewayOp, GatewayReply, T]


@dataclass(eq=False)
class Member:
    """One session of the gateway, named by the caller's key, and what a resume of it needs.

    The *base* is the newest resume token (from a checkpoint, ``snapshot`` or ``draining``; empty: zero state);
    ``since`` the inputs answered after it, in order, of which the first ``here`` are in the state of the
    session on its current stream. Inputs sent and not answered yet live in their requests (``Pending``).
    """

    key: str
    idle_timeout_s: int
    token: bytes = b""
    base_steps: int = 0  # steps in the base's state
    since: list[np.ndarray] = field(default_factory=list)  # each an answered [T, *frame], in order
    here: int = 0  # how many of ``since`` the session on its current stream has applied (all, but in a replay)
    gap: int = 0  # steps answered after the base whose inputs were not kept (checkpointing off)
    lane: Lane | None = None
    handle: int = 0
    session_id: str = ""
    model_sha256: str = ""
    steps: int = 0  # steps answered, the base's included
    stream_steps: int = 0  # steps in the state of its session on the current stream
    closing: bool = False  # a close was sent: never resumed just to close
    error: CellserveClientError | None = None  # why it cannot be stepped any more (idle close, lost)


@dataclass(eq=False)
class Outcome:
    """What one gateway call gets back, per key: a value (an output, a token, None) or an error."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, CellserveClientError] = field(default_factory=dict)
    blocks: list[tuple[list[str], np.ndarray]] = field(default_factory=list)  # answered [n, T, *out] and keys
    keyed: bool = True  # outputs wanted by key (``values``); else from ``blocks`` only (a columnar step)
    retry: list[tuple[Member, CellserveClientError]] = field(default_factory=list)  # opens to try elsewhere, why


@dataclass(eq=False)
class Pending:
    """A request sent on a lane and not answered yet. A step or snapshot whose stream breaks is sent again
    (with new handles and seq) on the stream that replaces it; ``outcome`` None: nobody waits for it."""

    kind: Literal["open", "step", "replay", "snapshot", "close"]
    lane: Lane
    seq: int
    members: list[Member]
    xs: np.ndarray | None = None  # a step's [n, T, *frame] (row i for members[i])
    checkpoint: bool = False
    outcome: Outcome | None = None
    done: bool = False


@dataclass(eq=False)
class Lane:
    """One ``Multiplex`` stream of the gateway, on ``targets[target]``: its sessions by handle, and its
    requests awaiting answers, in the order sent (the server answers them in that order)."""

    id: int
    target: int
    opened_at: float
    members: dict[int, Member] = field(default_factory=dict)
    inflight: deque[Pending] = field(default_factory=deque)
    next_seq: int = 1  # 0 marks the server's own events
    broken: str = ""  # why its stream cannot go on ("": it can); its sessions resume on their next use
    draining: bool = False
    full: bool = False  # its server refused an open for lack of room (its own or the stream's limit)
    move_wanted: bool = False  # draining, and another target may take its sessions
    recovery: Recovery | None = None  # from a failure until the replay on the new stream is answered
    checkpoint_at: float = 0.0  # when a step of it last asked for tokens

    def __post_init__(self) -> None:
        self.checkpoint_at = self.opened_at

    def load(self) -> int:
        """Sessions on it, and those being opened on it."""
        return len(self.members) + sum(len(p.members) for p in self.inflight if p.kind == "open")

    def seq(self) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq


@dataclass(frozen=True)
class GatewaySession:
    """A read-only view of one session of a gateway (``Gateway.session(key)``)."""

    key: str
    session_id: str  # the server's id (a new one after each move or resume)
    target: str  # the address holding it now ("" once it cannot go on)
    steps: int  # steps answered, including those in a resume token it opened with
    resume_token: bytes = field(repr=False)  # the newest token it holds (steps after it are replayed on a resume)
    error: CellserveClientError | None = None  # why it cannot be stepped any more (idle expiry, lost), else None


__all__ = [
    "DEFAULT_SESSIONS_PER_STREAM",
    "Describe",
    "EndLane",
    "Ended",
    "GatewayOp",
    "GatewayReply",
    "GatewayRoutine",
    "GatewaySession",
    "Lane",
    "Member",
    "Outcome",
    "Pause",
    "Pending",
    "PollOn",
    "ReceiveOn",
    "SendOn",
    "StartLane",
]
