"""What a session asks its I/O shell to do, what comes back, and the session's resilience settings.

The core's routines yield these operations; a shell performs each with the method named by its
``handler`` and sends the result back into the routine:

=========  ==================================================================  =========================
operation  the shell                                                           result
=========  ==================================================================  =========================
Open       starts a stream on ``targets[index]`` and writes ``request``; on an  its first response, or
           ``opened`` answer that stream becomes the current one and the        ``Ended``
           previous one is abandoned, otherwise the new one is dropped
Send       writes ``request`` on the current stream if it is still stream       None
           ``generation`` (else the core has replayed it); a failure shows at
           the next Receive
Receive    reads the current stream's next response                            a response, or ``Ended``
Room       (asyncio) waits until the reader has taken an output                 None
Pause      sleeps ``seconds`` (backoff between resume attempts)                None
Finish     half-closes the current stream                                      None
=========  ==================================================================  =========================

``perform`` is that loop for the blocking shells (``Session``, ``Gateway``); ``leave`` (``leave_async``) is what
every shell's ``with`` (``async with``) does on the way out. ``whole_seconds`` checks an ``idle_timeout_s`` as
the client takes it, for a session or a gateway.
"""

from __future__ import annotations

import numbers
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from cellserve.client.errors import CellserveClientError
from cellserve.v1 import cellserve_pb2 as pb

# Chosen by `cellserve bench checkpoint` (README, "Crash-safe sessions"): the cost of a token every 8 step
# messages is small next to the bench's noise, and a crash replays at most 8 messages.
DEFAULT_CHECKPOINT_EVERY = 8
DEFAULT_RESUME_TIMEOUT_S = 30.0
DEFAULT_MAX_IN_FLIGHT = 1024


@dataclass(frozen=True)
class SessionPolicy:
    """How a session survives its server.

    ``checkpoint_every``: every N step messages one asks for a resume token (piggybacked on its output);
    0 turns checkpointing off (then only drains move sessions, and a crash resumes only when no step
    was answered since the last token). ``resume_timeout_s``: how long a session may take to find a
    server again before the caller sees an error. ``max_in_flight``: pipelined ``send`` waits while this
    many steps are unanswered (bounds the replay buffer). ``checkpoint_max_age_s``: a step asks for a
    token when the newest one is older than this, so that a quiet session's checkpoint does not expire
    (servers keep tokens ``token_ttl_s``, 1 h by default).
    """

    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    checkpoint_max_age_s: float = 300.0

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every is {self.checkpoint_every}; use 0 (off) or N >= 1 step messages")
        if not self.resume_timeout_s >= 0:
            raise ValueError(f"resume_timeout_s is {self.resume_timeout_s}; use seconds >= 0")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight is {self.max_in_flight}; use at least 1")
        if not self.checkpoint_max_age_s > 0:
            raise ValueError(f"checkpoint_max_age_s is {self.checkpoint_max_age_s}; use seconds > 0")


def whole_seconds(idle_timeout_s: object) -> int:
    """An ``idle_timeout_s`` as the server takes it (``Open``, ``SessionOpen``): whole seconds, 0 to 2**32 - 1."""
    whole = isinstance(idle_timeout_s, numbers.Integral) and not isinstance(idle_timeout_s, bool)
    if not whole or not 0 <= idle_timeout_s < 2**32:  # type: ignore[operator]
        raise ValueError(
            f"idle_timeout_s is {idle_timeout_s!r}; use whole seconds >= 0 (0 = the server's default; "
            "the server grants at most its --max-idle-timeout-s)"
        )
    return int(idle_timeout_s)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Open:
    handler: ClassVar[str] = "_open_stream"
    index: int
    request: pb.StreamRequest
    generation: int  # the number the stream has once it is the current one


@dataclass(frozen=True)
class Send:
    handler: ClassVar[str] = "_send"
    request: pb.StreamRequest
    generation: int  # the stream it is for: a Send that waited while the stream was replaced is dropped


@dataclass(frozen=True)
class Receive:
    handler: ClassVar[str] = "_receive"


@dataclass(frozen=True)
class Room:
    handler: ClassVar[str] = "_wait_for_room"


@dataclass(frozen=True)
class Pause:
    handler: ClassVar[str] = "_pause"
    seconds: float


@dataclass(frozen=True)
class Finish:
    handler: ClassVar[str] = "_finish"


@dataclass(frozen=True)
class Ended:
    """The stream ended: ``error`` is the status it ended with (None: it ended OK)."""

    error: CellserveClientError | None = None


RECEIVE, ROOM = Receive(), Room()
Op = Open | Send | Receive | Room | Pause | Finish
Reply = pb.StreamResponse | Ended | None
T = TypeVar("T")
Routine = Generator[Op, Reply, T]  # a session call: yields operations, gets their results, returns a T


def perform(routine: Generator[Any, Any, T], shell: object) -> T:
    """Run a core's routine to its end, blocking: each operation it yields is performed by ``shell``'s method
    named by the operation's ``handler``, and the result sent back in."""
    reply = None
    try:
        while True:
            op = routine.send(reply)
            reply = getattr(shell, op.handler)(op)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        routine.close()


def leave(close: Callable[[], object], abandon: Callable[[], object], exc: BaseException | None) -> None:
    """What a shell's ``with`` does on the way out: ``close``; a close that fails ``abandon``s the streams, and
    is raised only when no exception left the block (it never masks that one)."""
    try:
        close()
    except CellserveClientError:
        abandon()
        if exc is None:
            raise


async def leave_async(
    close: Callable[[], Awaitable[object]], abandon: Callable[[], object], exc: BaseException | None
) -> None:
    """``leave`` for an asyncio shell's ``async with``."""
    try:
        await close()
    except CellserveClientError:
        abandon()
        if exc is None:
            raise
