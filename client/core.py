"""The session core: every decision a session takes, and no I/O.

A session's calls (open, step, send, next output, snapshot, end, close) are generator *routines* over five
operations, defined in ``cellserve.client.ops``: ``Open`` a stream on a target, ``Send`` a request, ``Receive``
the next response, ``Pause`` between retries, ``Finish`` (half-close). The sync ``Session`` performs them
blocking, the ``AsyncSession`` awaiting them; neither decides anything.

What the core keeps, per session, besides ids and counts: the *base* (the newest resume token it holds, from a
checkpoint step, ``snapshot`` or ``draining``; for a fresh session "no token", zero state) and the steps sent
since, each answered or not (``cellserve.client.replay``).

When the stream ends without ``closed`` (reset, UNAVAILABLE, keepalive timeout, an OK end), or with
``closed{DRAIN}``, the core reopens from the base on the next target (the others first, then the same address
again: another worker behind it, or a restarted server), replays the buffer and hands out only the outputs the
caller has not had. A ``draining`` notice moves the session at once when there is another target. Nothing
reaches the caller unless no server takes the session within ``resume_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
import numpy as np

from cellserve.client.errors import (
    CellserveClientError,
    FailedPreconditionError,
    SessionClosedError,
    UnavailableError,
    UnknownError,
    log_lost,
    status_code,
    step_rejected,
)
from cellserve.client.ops import RECEIVE, ROOM, Ended, Finish, Open, Pause, Reply, Routine, Send, SessionPolicy
from cellserve.client.recovery import Recovery, candidates, replay_gap
from cellserve.client.replay import ReplayBuffer, Sent
from cellserve.client.replies import (
    CLOSE_REASONS,
    CLOSED,
    SnapshotTaken,
    StepOutput,
    answer_error,
    closed_error,
    is_opened,
    resume_problem,
)
from cellserve.client.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb

log = logging.getLogger(__name__)


class SessionCore:
    """Client-side record and decisions of one session (see the module docstring)."""

    def __init__(
        self,
        targets: tuple[str, ...],
        policy: SessionPolicy,
        *,
        model: str = "",
        idle_timeout_s: int = 0,
        resume_token: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = targets
        self.policy = policy
        self.model = model  # as asked; the server's name for it once opened
        self.idle_timeout_s = idle_timeout_s  # as asked (ops.whole_seconds); what the server granted once opened
        self.session_id = ""
        self.model_sha256 = ""
        self.current = 0  # index in targets of the server holding the session
        self.steps = 0  # steps answered to the caller, those before a resume token included
        self.draining = False  # the current server announced a drain and the session has not moved yet
        self.closed_reason: str | None = None
        self.closed_message = ""
        self._clock = clock
        self._buffer = ReplayBuffer(policy, resume_token, clock)
        self._opens = 0  # Open operations so far: each stream's generation number
        self._stream = 0  # generation of the stream the shell holds
        self._control: list[pb.StreamRequest] = []  # snapshot/close sent and not answered: re-sent after a resume
        self._ending = False  # close was asked: no more steps
        self._resume_needed = False
        self._move_wanted = False
        self._recovery: Recovery | None = None
        self._lost: CellserveClientError | None = None  # why the session cannot go on

    @property
    def target(self) -> str:
        return self.targets[self.current]

    @property
    def resume_token(self) -> bytes:
        """The newest token this session holds (its base); steps answered after it are replayed on a resume."""
        return self._buffer.token

    @property
    def unanswered(self) -> int:
        """Steps sent whose output the caller has not had (and still wants)."""
        return self._buffer.unanswered

    # -- routines ---------------------------------------------------------------------------------

    def open(self, start: int) -> Routine[None]:
        """Open on the first target from ``start`` that takes the session; UNAVAILABLE ones are skipped."""
        skipped = []
        for k in range(len(self.targets)):
            index = (start + k) % len(self.targets)
            reply = yield from self._open_on(index)
            if is_opened(reply):
                assert isinstance(reply, pb.StreamResponse)
                o = reply.opened
                self.model, self.model_sha256, self._buffer.base_steps = o.model, o.model_sha256, o.steps
                self.steps = o.steps
                self._adopt(index, o)
                return
            error = answer_error(reply, "open")
            if not isinstance(error, UnavailableError):
                raise error
            skipped.append(f"{self.targets[index]}: {error.details}")
        raise UnavailableError("no server took the session: " + "; ".join(skipped))

    def step(self, x: np.ndarray) -> Routine[np.ndarray]:
        """Send one checked chunk and return its output [T, O] (no other step may be unanswered)."""
        self._check_can_step(alone=True)
        seq = self._buffer.next_seq
        try:
            yield from self._send(x)
            while True:
                event = yield from self._next_event()
                if isinstance(event, StepOutput):
                    assert event.seq == seq, (event.seq, seq)  # nothing else was unanswered
                    return event.y
                if event is CLOSED:
                    raise self._closed_error()
        except GeneratorExit:  # the caller gave up (a cancelled await): the step still runs, unseen
            self._buffer.abandon(seq)
            raise

    def send(self, x: np.ndarray) -> Routine[int]:
        """Send one checked chunk without waiting for its output; returns its seq."""
        self._check_can_step(alone=False)
        while self.unanswered >= self.policy.max_in_flight:
            yield ROOM  # the shell waits for the reader to take outputs
            self._check_can_step(alone=False)
        return (yield from self._send(x))

    def next_output(self) -> Routine[StepOutput | None]:
        """The next output of a pipelined session; None once it is closed with nothing unanswered."""
        if self.closed_reason == "client" and not self.unanswered:
            return None
        while True:
            event = yield from self._next_event()
            if isinstance(event, StepOutput):
                return event
            if event is CLOSED:
                if self.unanswered:
                    raise self._closed_error()
                return None

    def snapshot(self) -> Routine[bytes]:
        """An exact token of the state now (becomes the base)."""
        self._check_can_step(alone=True)
        request = pb.StreamRequest(snapshot=pb.Snapshot())
        self._control.append(request)
        if not self._resume_needed:
            yield Send(request, self._stream)
        while True:
            event = yield from self._next_event()
            if isinstance(event, SnapshotTaken):
                return event.token
            if event is CLOSED:
                raise self._closed_error()

    def end(self) -> Routine[None]:
        """Ask the server to close once every step sent is answered (the outputs still come)."""
        if self._ending or self.closed_reason is not None or self._lost is not None:
            return
        self._ending = True
        request = pb.StreamRequest(close=pb.Close())
        self._control.append(request)
        if not self._resume_needed:
            yield Send(request, self._stream)

    def close(self) -> Routine[None]:
        """Close now: outputs not yet taken are discarded; never resumes just to close. Idempotent."""
        if self.closed_reason is None and self._lost is None and not self._resume_needed:
            self._buffer.abandon_all()
            if not self._ending:
                self._ending = True
                yield Send(pb.StreamRequest(close=pb.Close()), self._stream)
            while True:
                reply = yield RECEIVE
                if isinstance(reply, Ended):
                    break
                if reply.WhichOneof("kind") == "closed":
                    self.closed_reason = CLOSE_REASONS.get(reply.closed.reason, "unspecified")
                    break
        self.closed_reason = self.closed_reason or "client"
        self._ending = True
        yield Finish()

    # -- the receive loop -------------------------------------------------------------------------

    def _next_event(self) -> Routine[StepOutput | SnapshotTaken | object]:
        """Receive until there is something for the caller; resumes and moves the session as needed.

        Raises the caller's StepRejected, and the session's error once it cannot go on.
        """
        while True:
            if self._lost is not None:
                raise self._lost
            if self._resume_needed:
                yield from self._resume()
                continue
            if self._move_wanted:
                self._move_wanted = False
                yield from self._move()
                continue
            event = self._on_reply((yield RECEIVE))
            if event is not None:
                return event

    def _on_reply(self, reply: Reply) -> StepOutput | SnapshotTaken | object | None:
        if isinstance(reply, Ended):
            return self._on_end(reply.error)
        assert reply is not None
        kind = reply.WhichOneof("kind")
        if kind == "output":
            return self._on_output(reply.output)
        if kind == "error":
            return self._on_rejected(reply.error)
        if kind == "draining":
            self._buffer.absorb(reply.draining.resume_token)
            self.draining = True
            self._move_wanted = len(self.targets) > 1 and (not self._ending or self.unanswered > 0)
            return None
        if kind == "snapshot":
            self._buffer.absorb(reply.snapshot.token)
            self._control = [r for r in self._control if r.WhichOneof("kind") != "snapshot"]
            return SnapshotTaken(reply.snapshot.token)
        if kind == "closed":
            return self._on_closed(reply.closed)
        raise self._lose(UnknownError(f"unexpected response {kind!r} in an open session; expected output or closed"))

    def _on_output(self, out: pb.Output) -> StepOutput | None:
        e = self._expect(out.seq)
        if not e.answered:
            self.steps += e.steps
        deliver = self._buffer.answered(e, out.resume_token)
        if self._recovery is not None and self._buffer.caught_up:
            self._recovery = None  # the replay has caught up: the session is back
        return StepOutput(out.seq, to_numpy(out.output)) if deliver else None

    def _on_rejected(self, err: pb.StepError) -> None:
        e = self._expect(err.seq)
        rejected = step_rejected(err.seq, status_code(err.code), err.message)
        if e.answered:  # a replayed step the first server ran and this one refuses: its state is not ours
            refused = rejected.code != grpc.StatusCode.RESOURCE_EXHAUSTED  # a full queue may drain
            self._stream_failed(f"{self.target} refused a replayed step ({rejected})", refused=refused)
            return None
        self._buffer.rejected(e)
        if e.wanted:
            raise rejected
        return None

    def _on_closed(self, closed: pb.Closed) -> object | None:
        reason = CLOSE_REASONS.get(closed.reason, "unspecified")
        if reason == "drain" and (self.unanswered or not self._ending):
            self._stream_failed(f"{self.target} closed the session for its drain")
            return None
        self.closed_reason, self.closed_message = reason, closed.message
        if reason in ("client", "drain"):
            return CLOSED
        raise self._lose(self._closed_error())

    def _on_end(self, error: CellserveClientError | None) -> object | None:
        if self._ending and not self.unanswered:
            self.closed_reason = self.closed_reason or "client"
            return CLOSED  # it was closing anyway: nothing to resume for
        if error is None or isinstance(error, UnavailableError):
            how = f" ({error.details})" if error else " without closing the session"
            why = f"{self.target} ended the stream{how}"
            self._stream_failed(why)
            return None
        raise self._lose(error)

    def _expect(self, seq: int) -> Sent:
        e = self._buffer.expect()
        if e is None or e.seq != seq:
            want = "none" if e is None else str(e.seq)
            raise self._lose(UnknownError(f"server answered seq {seq}; the next step awaiting an answer is {want}"))
        return e

    def _send(self, x: np.ndarray) -> Routine[int]:
        request = self._buffer.record(x)
        if not self._resume_needed:  # otherwise the resume's replay sends it
            yield Send(request, self._stream)
        return request.step.seq

    # -- resuming and moving ----------------------------------------------------------------------

    def _stream_failed(self, why: str, *, refused: bool = False) -> None:
        self._resume_needed, self._move_wanted = True, False
        if self._recovery is None:
            self._recovery = Recovery(self.targets, self.policy.resume_timeout_s, self._clock())
            log.info("session lost its server; resuming", extra={"session": self.session_id, "why": why})
        self._recovery.note(self.current, why, refused=refused)

    def _resume(self) -> Routine[None]:
        """Reopen from the base on the other targets, then this one again, until one takes the session."""
        if self._buffer.gap:
            raise self._lose(replay_gap(self.target, self._buffer.gap, self._buffer.base_steps))
        assert self._recovery is not None
        recovery = self._recovery
        while True:
            pause = recovery.next_round(self._clock())
            if isinstance(pause, CellserveClientError):
                raise self._lose(pause)
            if pause:
                yield Pause(pause)
            for index in candidates(len(self.targets), self.current, include_current=True):
                if index not in recovery.refused and (yield from self._reopen(index, recovery)):
                    return

    def _move(self) -> Routine[None]:
        """The server drains: reopen on another target now from its (current) token; else stay until it closes."""
        recovery = Recovery(self.targets, self.policy.resume_timeout_s, self._clock())
        for index in candidates(len(self.targets), self.current, include_current=False):
            if (yield from self._reopen(index, recovery)):
                log.info("session moved off a draining server", extra={"session": self.session_id})
                return
            if self._resume_needed:  # a wrong session was opened there and replaced the draining one
                return
        log.info("no other server took a draining session; it stays", extra={"answers": recovery.answers})

    def _open_on(self, index: int) -> Routine[Reply]:
        self._opens += 1
        opening = pb.Open(model=self.model, resume_token=self._buffer.token, idle_timeout_s=self.idle_timeout_s)
        reply = yield Open(index, pb.StreamRequest(open=opening), self._opens)
        if is_opened(reply):
            self._stream = self._opens
        return reply

    def _reopen(self, index: int, recovery: Recovery) -> Routine[bool]:
        reply = yield from self._open_on(index)
        problem = resume_problem(reply, self.model_sha256, self._buffer.base_steps)
        if problem is None:
            assert isinstance(reply, pb.StreamResponse)
            self._adopt(index, reply.opened)
            yield from self._replay()
            return True
        recovery.answered(index, problem)
        if is_opened(reply):  # the shell took that stream: it is the current one now, and wrong
            self.current = index
            self._stream_failed(str(problem), refused=True)
        return False

    def _adopt(self, index: int, o: pb.Opened) -> None:
        self.current, self.session_id, self.idle_timeout_s = index, o.session_id, o.idle_timeout_s
        self._buffer.new_stream(o.steps)
        self.draining, self._resume_needed = False, False

    def _replay(self) -> Routine[None]:
        """Send the kept steps again, then a snapshot or close that was waiting for its answer."""
        requests = self._buffer.replay()
        for request in requests + self._control:
            yield Send(request, self._stream)
        if requests and self._recovery is not None:
            where = {"session": self.session_id, "target": self.target}
            log.info("session resumed", extra={**where, "replayed": len(requests)})
        if self._buffer.caught_up:
            self._recovery = None

    def _check_can_step(self, *, alone: bool) -> None:
        if self._lost is not None:
            raise self._lost
        if self.closed_reason is not None:
            raise self._closed_error()
        if self._ending:
            raise FailedPreconditionError("end() or close() was called; this session takes no more steps")
        if alone and self.unanswered:
            raise FailedPreconditionError(
                f"{self.unanswered} pipelined steps are unanswered; read their outputs (async for) before "
                "step() or snapshot()"
            )

    def _closed_error(self) -> SessionClosedError:
        return closed_error(self.session_id, self.closed_reason, self.closed_message)

    def _lose(self, error: CellserveClientError) -> CellserveClientError:
        """Keep why the session cannot go on (raised on every later call), and log it once."""
        if self._lost is None:
            self._lost = error
            log_lost(log, f"session {self.session_id}", self.session_id, error)
        return self._lost
