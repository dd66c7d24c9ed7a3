"""A session's base (its newest resume token) and the steps sent since it: what a resume replays.

Every ``checkpoint_every`` step messages one step asks for a token (``Step.checkpoint``); it comes back
on that step's output. Any token in the stream (checkpoint, ``snapshot``, ``draining``) holds the state
after every output received before it, so the buffer is cut there: it holds at most
``checkpoint_every`` answered steps plus those in flight. No I/O; ``SessionCore`` owns one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cellserve.client.ops import SessionPolicy
from cellserve.client.tensors import to_proto
from cellserve.v1 import cellserve_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class Sent:
    """A step sent since the base, replayed after a resume until a newer token covers it."""

    seq: int
    x: np.ndarray
    steps: int  # T
    answered: bool = False  # its output was received once (handed out, or discarded if unwanted)
    wanted: bool = True  # False once its caller gave up on it (a cancelled ``await step``)
    here: bool = False  # answered on the current stream


class ReplayBuffer:
    """The base and the steps since, in seq order (see the module docstring)."""

    def __init__(self, policy: SessionPolicy, token: bytes, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.token, self.base_steps, self._base_at = token, 0, clock()  # an empty token: zero state
        self.stream_steps = 0  # steps in the state of the current stream's session
        self.gap = 0  # steps answered since the base whose inputs were not kept (checkpointing off)
        self.checkpoints = policy.checkpoint_every > 0  # off, or the server ignores Step.checkpoint
        self.next_seq = 0
        self._sent: dict[int, Sent] = {}  # insertion order is seq order
        self._checkpoint_seq: int | None = None  # a step that asked for a token and is not answered yet
        self._clock = clock

    @property
    def unanswered(self) -> int:
        """Steps sent whose output the caller has not had (and still wants)."""
        return sum(1 for e in self._sent.values() if e.wanted and not e.answered)

    @property
    def caught_up(self) -> bool:
        """Every step answered before is answered again on this stream (a replay is over)."""
        return all(e.here or not e.answered for e in self._sent.values())

    def __len__(self) -> int:
        return len(self._sent)

    def record(self, x: np.ndarray) -> pb.StreamRequest:
        """A new step: kept, and its request (asking for a checkpoint when one is due)."""
        e = Sent(self.next_seq, x, int(x.shape[0]))
        self.next_seq += 1
        self._sent[e.seq] = e
        due = len(self._sent) >= self.policy.checkpoint_every  # (this one included)
        stale = self._clock() - self._base_at > self.policy.checkpoint_max_age_s
        return self._request(e, self.checkpoints and self._checkpoint_seq is None and (due or stale))

    def replay(self) -> list[pb.StreamRequest]:
        """Every kept step again, in order, on a new stream; the last one asks for a checkpoint."""
        self._checkpoint_seq = None
        entries = list(self._sent.values())
        return [self._request(e, self.checkpoints and k == len(entries) - 1) for k, e in enumerate(entries)]

    def new_stream(self, steps: int) -> None:
        """The session is open on a new stream whose state holds ``steps`` (the base's)."""
        self.stream_steps = steps
        for e in self._sent.values():
            e.here = False

    def expect(self) -> Sent | None:
        """The step the next answer must be for: the first one not yet answered on this stream."""
        return next((e for e in self._sent.values() if not e.here), None)

    def answered(self, e: Sent, token: bytes) -> bool:
        """``e``'s output arrived (with a token if it asked for one). Returns whether the caller gets it."""
        e.here, self.stream_steps = True, self.stream_steps + e.steps
        deliver = e.wanted and not e.answered
        e.answered = True
        if e.seq == self._checkpoint_seq:
            self._checkpoint_seq = None
            if not token:  # a server that predates Step.checkpoint: keep no replay buffer
                log.warning("the server ignores Step.checkpoint: crash resume needs snapshot() now")
                self.checkpoints = False
        if token:
            self.absorb(token)
        elif not self.checkpoints:
            self.gap += self._cut()
        return deliver

    def rejected(self, e: Sent) -> None:
        """``e`` was refused: it left no trace in the state, and is never replayed."""
        del self._sent[e.seq]
        if e.seq == self._checkpoint_seq:
            self._checkpoint_seq = None

    def abandon(self, seq: int) -> None:
        e = self._sent.get(seq)
        if e is not None and not e.answered:
            e.wanted = False

    def abandon_all(self) -> None:
        for e in self._sent.values():
            e.wanted = False

    def absorb(self, token: bytes) -> None:
        """A token in the stream: the state after every output received before it is the new base."""
        if token:
            self.token, self.base_steps, self._base_at = token, self.stream_steps, self._clock()
            self._cut()
            self.gap = 0

    def _request(self, e: Sent, checkpoint: bool) -> pb.StreamRequest:
        if checkpoint:
            self._checkpoint_seq = e.seq
        return pb.StreamRequest(step=pb.Step(seq=e.seq, input=to_proto(e.x), checkpoint=checkpoint))

    def _cut(self) -> int:
        """Drop the steps answered on this stream (a prefix of the buffer); returns their step count."""
        dropped = 0
        for seq in list(self._sent):
            e = self._sent[seq]
            if not e.here:
                break
            dropped += e.steps
            del self._sent[seq]
        return dropped
