"""The session core's decisions, driven without I/O: a scripted cluster performs its operations.

The toy servers run a model whose output row for a step is the step's position in the session
(``[n, n+1, ...]``) and whose token is the step count, so a resume from the wrong state, a lost or
repeated step, or an output handed out twice shows in the outputs themselves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from cellserve.client.core import SessionCore
from cellserve.client.errors import (
    CancelledError,
    DataLossError,
    FailedPreconditionError,
    InvalidInputError,
    UnavailableError,
    UnknownError,
)
from cellserve.client.ops import ROOM, Ended, Finish, Open, Pause, Receive, Room, Send, SessionPolicy
from cellserve.client.tensors import to_numpy, to_proto
from cellserve.v1 import cellserve_pb2 as pb

SHA = "5" * 64


@dataclass
class _Stream:
    target: int
    steps: int
    responses: deque = field(default_factory=deque)
    alive: bool = True


class Cluster:
    """Targets a, b, c, ... that can be killed, drained, restarted or made to refuse tokens."""

    def __init__(self, n: int = 2) -> None:
        self.targets = tuple(f"t{i}:1" for i in range(n))
        self.up = [True] * n
        self.refuse = [""] * n  # a status name the target answers every resume open with
        self.ignores_checkpoint = [False] * n
        self.stream: _Stream | None = None
        self.sent: list[pb.Step] = []  # every step written on a live stream, in order
        self.opens: list[int] = []  # target index of every Open
        self.pauses: list[float] = []
        self.now = 0.0

    def core(self, **policy: Any) -> SessionCore:
        return SessionCore(self.targets, SessionPolicy(**policy), model="toy", clock=lambda: self.now)

    def opened(self, policy: dict | None = None) -> SessionCore:
        core = self.core(**(policy or {}))
        self.run(core.open(0))
        return core

    def run(self, routine: Any) -> Any:
        reply = None
        try:
            while True:
                op = routine.send(reply)
                reply = self.perform(op)
        except StopIteration as done:
            return done.value

    def perform(self, op: Any) -> Any:
        if isinstance(op, Open):
            self.opens.append(op.index)
            return self._open(op)
        if isinstance(op, Send):
            if self.stream is not None and self.stream.alive:
                self._answer(op.request)
            return None
        if isinstance(op, Receive):
            s = self.stream
            if s is not None and s.responses:
                return s.responses.popleft()
            return Ended(UnavailableError("Socket closed"))
        if isinstance(op, Pause):
            self.pauses.append(op.seconds)
            self.now += op.seconds
            return None
        assert isinstance(op, (Finish, Room)), op
        return None

    def _open(self, op: Open) -> Any:
        i = op.index
        if not self.up[i]:
            return Ended(UnavailableError(f"{self.targets[i]}: connection refused"))
        token = op.request.open.resume_token
        if token and self.refuse[i]:
            code = grpc.StatusCode[self.refuse[i]]
            return Ended(UnavailableError("x") if code == grpc.StatusCode.UNAVAILABLE else _err(code, "token refused"))
        if self.stream is not None:
            self.stream.alive = False  # the shell abandons the stream it replaces
        self.stream = _Stream(i, int(token.decode()) if token else 0)
        opened = pb.Opened(session_id=f"s{len(self.opens)}", model="toy", steps=self.stream.steps, model_sha256=SHA)
        return pb.StreamResponse(opened=opened)

    def _answer(self, req: pb.StreamRequest) -> None:
        s = self.stream
        assert s is not None
        kind = req.WhichOneof("kind")
        if kind == "step":
            self.sent.append(req.step)
            x = to_numpy(req.step.input)
            if x.min() < 0:  # the toy server's own input check
                s.responses.append(pb.StreamResponse(error=pb.StepError(seq=req.step.seq, code=3, message="neg")))
                return
            y = np.arange(s.steps, s.steps + len(x), dtype=np.float32)[:, None]  # [T, 1]
            s.steps += len(x)
            out = pb.Output(seq=req.step.seq, output=to_proto(y))
            if req.step.checkpoint and not self.ignores_checkpoint[s.target]:
                out.resume_token = str(s.steps).encode()
            s.responses.append(pb.StreamResponse(output=out))
        elif kind == "snapshot":
            s.responses.append(pb.StreamResponse(snapshot=pb.SnapshotTaken(token=str(s.steps).encode())))
        elif kind == "close":
            s.responses.append(pb.StreamResponse(closed=pb.Closed(steps=s.steps, reason=pb.CLOSE_REASON_CLIENT)))

    def kill(self, i: int, *, keep: int = 0) -> None:
        """Target i dies; its stream delivers ``keep`` more responses at most, then ends."""
        self.up[i] = False
        if self.stream is not None and self.stream.target == i:
            self.stream.alive = False
            while len(self.stream.responses) > keep:
                self.stream.responses.pop()

    def drain(self, i: int) -> None:
        s = self.stream
        assert s is not None and s.target == i
        s.responses.append(pb.StreamResponse(draining=pb.Draining(resume_token=str(s.steps).encode())))


def _err(code: grpc.StatusCode, details: str) -> Ended:
    from cellserve.client.errors import error_class

    return error_class(code)(details, code)


def step(cluster: Cluster, core: SessionCore, n: int) -> np.ndarray:
    """One chunk of n steps; returns the outputs' positions."""
    return cluster.run(core.step(np.ones(n, np.int64)))[:, 0]


def positions(start: int, n: int) -> list[float]:
    return list(map(float, range(start, start + n)))


def test_every_nth_step_asks_for_a_checkpoint_and_the_buffer_is_cut_at_its_token():
    cluster = Cluster()
    core = cluster.opened({"checkpoint_every": 4})
    for k in range(12):
        assert list(step(cluster, core, 2)) == positions(2 * k, 2)
        assert len(core._buffer) == (k + 1) % 4  # answered steps since the last token
    assert [s.checkpoint for s in cluster.sent] == [False, False, False, True] * 3
    assert core.resume_token == b"24" and core.steps == 24


@pytest.mark.parametrize(("every", "flags"), [(1, [True] * 4), (0, [False] * 4)])
def test_checkpoint_every_1_asks_on_each_step_and_0_never(every, flags):
    cluster = Cluster()
    core = cluster.opened({"checkpoint_every": every})
    for _ in range(4):
        step(cluster, core, 1)
    assert [s.checkpoint for s in cluster.sent] == flags
    assert not core._buffer  # nothing kept: every step is covered by a token, or checkpointing is off


def test_a_crash_resumes_on_the_next_target_replays_since_the_token_and_hands_out_nothing_twice():
    cluster = Cluster(3)
    core = cluster.opened({"checkpoint_every": 4})
    for _ in range(6):  # token after step 4 (8 steps); messages 5 and 6 answered after it
        step(cluster, core, 2)
    cluster.kill(0)
    cluster.sent.clear()
    assert list(step(cluster, core, 3)) == positions(12, 3)  # the caller sees its step's output only
    assert cluster.opens == [0, 1] and core.target == "t1:1" and core.steps == 15
    assert [s.seq for s in cluster.sent] == [4, 5, 6]  # the buffer, in order, then the step in flight
    assert [s.checkpoint for s in cluster.sent] == [False, False, True]  # the last replayed one asks
    assert core.resume_token == b"15" and not core._buffer


def test_a_step_in_flight_when_the_server_died_is_rerun_and_answered_once():
    cluster = Cluster()
    core = cluster.opened({"checkpoint_every": 8})
    step(cluster, core, 5)
    cluster.kill(0)  # before the next step is answered: its output never comes from t0
    assert list(step(cluster, core, 1)) == [5.0]
    assert core.steps == 6 and core.target == "t1:1"


def test_after_the_others_the_same_address_is_tried_again_then_with_growing_pauses():
    cluster = Cluster(2)
    core = cluster.opened({"checkpoint_every": 2})
    step(cluster, core, 1)
    cluster.kill(0)
    cluster.up[1] = False
    restarted = {"after": 3}

    original = cluster._open

    def open_after_restart(op: Open) -> Any:
        restarted["after"] -= 1
        if restarted["after"] == 0:
            cluster.up[0] = True  # t0 is back (a restart, or another worker on its port)
        return original(op)

    cluster._open = open_after_restart  # type: ignore[method-assign]
    assert list(step(cluster, core, 1)) == [1.0]
    assert cluster.opens == [0, 1, 0, 1, 0]  # others first, then the same address; round after round
    assert cluster.pauses == [0.05] and core.target == "t0:1"


def test_with_no_server_back_within_the_timeout_the_error_is_unavailable_and_final():
    cluster = Cluster(2)
    core = cluster.opened({"resume_timeout_s": 3})
    step(cluster, core, 1)
    cluster.kill(0)
    cluster.kill(1)
    with pytest.raises(UnavailableError, match=r"no server took the session within 3 s; t0:1: .*refused; t1:1: .*ref"):
        step(cluster, core, 1)
    assert sum(cluster.pauses) == pytest.approx(3) and max(cluster.pauses) == 1.0  # capped backoff
    with pytest.raises(UnavailableError):  # every later call says the same
        step(cluster, core, 1)


def test_a_token_every_target_refuses_is_data_loss_at_once_without_waiting():
    cluster = Cluster(2)
    core = cluster.opened({"checkpoint_every": 1})
    step(cluster, core, 1)
    cluster.refuse = ["FAILED_PRECONDITION", "UNAUTHENTICATED"]
    cluster.kill(0, keep=0)
    cluster.up[0] = True  # t0 answers again (restarted), but refuses the token too
    with pytest.raises(DataLossError, match=r"no server could continue this session.*token refused"):
        step(cluster, core, 1)
    assert cluster.pauses == []


def test_a_drain_moves_the_session_at_once_from_its_token_replaying_only_the_unanswered():
    cluster = Cluster(2)
    core = cluster.opened({"checkpoint_every": 64})
    for _ in range(3):
        step(cluster, core, 2)
    cluster.drain(0)  # pushed while the session was idle: read before the next step's output
    cluster.sent.clear()
    assert list(step(cluster, core, 1)) == [6.0]
    assert core.target == "t1:1" and not core.draining
    assert [s.seq for s in cluster.sent] == [3, 3]  # sent to t0, then replayed on t1 from the drain token


def test_a_drain_with_no_other_target_keeps_the_session_and_its_token():
    cluster = Cluster(1)
    core = cluster.opened()
    step(cluster, core, 2)
    cluster.drain(0)
    assert list(step(cluster, core, 1)) == [2.0]
    assert core.draining and core.target == "t0:1" and core.resume_token == b"2"


def test_a_server_that_ignores_step_checkpoint_turns_checkpointing_off_and_keeps_nothing():
    cluster = Cluster()
    cluster.ignores_checkpoint[0] = True
    core = cluster.opened({"checkpoint_every": 2})
    for _ in range(5):
        step(cluster, core, 1)
    assert [s.checkpoint for s in cluster.sent] == [False, True, False, False, False]
    assert not core._buffer  # the buffer does not grow without tokens
    cluster.kill(0)
    with pytest.raises(DataLossError, match="checkpointing off"):
        step(cluster, core, 1)


def test_a_rejected_step_is_the_callers_error_and_is_never_replayed():
    cluster = Cluster()
    core = cluster.opened({"checkpoint_every": 8})
    step(cluster, core, 2)
    with pytest.raises(InvalidInputError, match="neg") as err:
        cluster.run(core.step(np.array([-1], np.int64)))  # passed the (absent) client check; the server refuses
    assert err.value.seq == 1
    step(cluster, core, 1)
    cluster.kill(0)
    cluster.sent.clear()
    assert list(step(cluster, core, 1)) == [3.0]
    assert [s.seq for s in cluster.sent] == [0, 2, 3]


def test_pipelined_sends_wait_for_room_and_outputs_come_in_order_through_a_crash():
    cluster = Cluster()
    core = cluster.opened({"checkpoint_every": 3, "max_in_flight": 4})
    for _ in range(4):
        assert cluster.run(core.send(np.ones(1, np.int64))) is not None
    routine = core.send(np.ones(1, np.int64))
    assert next(routine) is ROOM  # 4 unanswered: the shell waits for the reader
    routine.close()
    got = [cluster.run(core.next_output()).y[0, 0] for _ in range(2)]
    cluster.kill(0)  # outputs 2 and 3 are lost with t0
    got += [cluster.run(core.next_output()).y[0, 0] for _ in range(2)]
    assert got == [0.0, 1.0, 2.0, 3.0]
    cluster.run(core.end())
    assert cluster.run(core.next_output()) is None


def test_a_cancelled_step_still_runs_and_its_output_is_discarded():
    cluster = Cluster()
    core = cluster.opened()
    routine = core.step(np.ones(2, np.int64))
    op = next(routine)
    assert isinstance(op, Send)
    cluster.perform(op)
    routine.close()  # the caller was cancelled while waiting for its output
    assert list(step(cluster, core, 1)) == [2.0] and core.steps == 3


def test_an_output_for_another_step_than_the_next_is_an_error_and_ends_the_session():
    cluster = Cluster()
    core = cluster.opened()
    assert cluster.stream is not None
    cluster.stream.responses.append(pb.StreamResponse(output=pb.Output(seq=7, output=to_proto(np.zeros((1, 1))))))
    with pytest.raises(UnknownError, match="server answered seq 7; the next step awaiting an answer is 0"):
        step(cluster, core, 1)
    with pytest.raises(UnknownError):
        step(cluster, core, 1)


def test_a_stream_ended_with_a_status_that_is_not_the_servers_absence_is_raised_not_resumed():
    cluster = Cluster()
    core = cluster.opened()

    def cancelled(op: Any) -> Any:
        return Ended(CancelledError("Channel closed!")) if isinstance(op, Receive) else Cluster.perform(cluster, op)

    cluster.perform = cancelled  # type: ignore[method-assign]
    with pytest.raises(CancelledError, match="Channel closed"):
        step(cluster, core, 1)
    assert cluster.opens == [0]


def test_step_and_snapshot_refuse_while_pipelined_steps_are_unanswered_and_after_end():
    cluster = Cluster()
    core = cluster.opened()
    cluster.run(core.send(np.ones(1, np.int64)))
    for routine in (core.step(np.ones(1, np.int64)), core.snapshot()):
        with pytest.raises(FailedPreconditionError, match="1 pipelined steps are unanswered"):
            cluster.run(routine)
    cluster.run(core.end())
    with pytest.raises(FailedPreconditionError, match="end\\(\\) or close\\(\\) was called"):
        cluster.run(core.send(np.ones(1, np.int64)))


def test_a_quiet_sessions_next_step_asks_for_a_fresh_checkpoint():
    cluster = Cluster()
    core = cluster.opened({"checkpoint_every": 64, "checkpoint_max_age_s": 60})
    step(cluster, core, 1)
    cluster.now += 61
    step(cluster, core, 1)
    assert [s.checkpoint for s in cluster.sent] == [False, True]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("checkpoint_every", -1, "use 0 \\(off\\) or N >= 1"),
        ("resume_timeout_s", -1.0, "seconds >= 0"),
        ("max_in_flight", 0, "at least 1"),
    ],
)
def test_policy_values_are_checked_with_what_is_expected(field, value, message):
    with pytest.raises(ValueError, match=message):
        SessionPolicy(**{field: value})
