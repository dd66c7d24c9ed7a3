"""The gateway core's decisions, driven without I/O: a scripted cluster of toy Multiplex servers performs its
operations.

The toy model's output for a session's step is the step's position in the session (``[n, n+1, ...]``, [T, 1]) and
its token is the step count, so a resume from the wrong state, a lost or repeated step, or an output handed out
twice shows in the outputs themselves: a key's outputs, concatenated, must be ``0, 1, 2, ...``.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from gateway_cluster import FORBIDDEN, Cluster, ToyStream

from cellserve.client.errors import (
    DataLossError,
    FailedPreconditionError,
    SessionClosedError,
    StepRejected,
    UnavailableError,
)
from cellserve.client.gateway_ops import ReceiveOn, SendOn
from cellserve.v1 import cellserve_pb2 as pb


def positions(outputs: list[np.ndarray]) -> list[int]:
    return [int(v) for y in outputs for v in np.asarray(y).reshape(-1)]


def test_a_step_in_flight_when_the_server_dies_is_answered_once_on_the_other(caplog):
    caplog.set_level(logging.INFO, logger="cellserve.client")
    c = Cluster()
    core = c.core(checkpoint_every=2)
    keys = ["a", "b", "c"]
    assert c.run(core.open(keys, {})) == keys
    ys = [c.run(core.step_arrays(keys, np.ones((3, 2), np.int64))) for _ in range(3)]  # a token after 4 steps
    c.on_send = lambda req: c.kill(0) if req.WhichOneof("kind") == "step" else None  # dies under the next step
    ys.append(c.run(core.step_arrays(keys, np.ones((3, 3), np.int64))))
    c.on_send = None
    ys.append(c.run(core.step({"a": [1], "c": [2, 3]}))["a"][None])
    for i in range(3):
        assert positions([y[i] for y in ys[:4]]) == list(range(9)), keys[i]
    assert positions([ys[4][0]]) == [9]
    assert {core.session(k).target for k in keys} == {"t1:1"} and core.session("c").steps == 11
    assert [r[0] for r in c.rows].count(1) == 3 + 3 + 2  # rows: the replayed ones since the token, the rest
    resumed = [r for r in caplog.records if r.getMessage() == "gateway sessions resumed"]
    assert len(resumed) == 1 and resumed[0].replayed == 3


def test_with_one_target_a_restarted_server_takes_the_sessions_back():
    c = Cluster(1)
    core = c.core(checkpoint_every=1)
    c.run(core.open(["a"], {}))
    c.run(core.step({"a": [1, 2]}))
    c.kill(0)
    c.up[0] = True  # restarted at the same address
    assert positions([c.run(core.step({"a": [3]}))["a"]]) == [2]


def test_an_answer_out_of_order_is_a_broken_stream_and_the_sessions_resume():
    c = Cluster()
    core = c.core()
    c.run(core.open(["a", "b"], {}))
    c.run(core.step({"a": [1]}))
    c.push(0, lambda s: pb.MultiplexResponse(seq=99, snapshot=pb.SessionsSnapshot()))
    y = c.run(core.step({"a": [1], "b": [2]}))
    assert positions([y["a"], y["b"]]) == [1, 0] and core.session("a").target == "t1:1"


def test_no_server_within_the_resume_timeout_fails_only_that_streams_keys():
    c = Cluster()
    core = c.core(resume_timeout_s=1, sessions_per_stream=2)
    c.run(core.open(["a", "b"], {}))  # a stream on t0, full
    c.up[0] = False
    c.run(core.open(["d"], {}))  # t0 takes no new stream: d's goes to t1
    assert core.open_streams() == ["t0:1", "t1:1"]
    c.kill(0)
    c.up[1] = False  # t1 takes no new stream either; d's stays
    result, errors = c.outcome(core.step({"a": [1], "b": [2], "d": [3]}))
    assert list(result) == ["d"] and set(errors) == {"a", "b"}
    assert all(isinstance(e, UnavailableError) and "within 1 s" in e.details for e in errors.values())
    assert c.now >= 1  # rounds of attempts, paused in between
    assert core.keys == ["d"] and core.session("a").error is errors["a"] and core.open_streams() == ["t1:1"]


def test_a_session_whose_token_the_new_server_refuses_fails_alone(caplog):
    c = Cluster()
    core = c.core(checkpoint_every=1)
    c.run(core.open(["a", "b"], {}))
    c.run(core.step({"a": [1], "b": [1, 2]}))
    c.refuse_tokens.add(b"2")  # b's token (2 steps)
    c.kill(0)
    result, errors = c.outcome(core.step({"a": [5], "b": [6]}))
    assert positions([result["a"]]) == [1] and list(errors) == ["b"]
    assert isinstance(errors["b"], DataLossError) and "t1:1 could not continue session 'b'" in errors["b"].details
    (lost,) = [r for r in caplog.records if "cannot go on" in r.getMessage()]
    assert lost.key == "b" and lost.levelno == logging.WARNING


def test_a_row_the_server_refuses_fails_alone_and_is_not_replayed():
    c = Cluster()
    core = c.core(checkpoint_every=8)
    c.run(core.open(["a", "b"], {}))
    result, errors = c.outcome(core.step_arrays(["a", "b"], [[1, 2], [3, FORBIDDEN]]))
    assert isinstance(errors["b"], StepRejected) and errors["b"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert positions([result[0]]) == [0, 1] and not result[1].any()
    c.kill(0)
    y = c.run(core.step_arrays(["a", "b"], [[1], [2]]))
    assert positions([y[0], y[1]]) == [2, 0]  # b's refused row left no trace, here or in the replay


def test_every_checkpoint_every_steps_of_a_session_a_request_asks_for_tokens():
    c = Cluster()
    core = c.core(checkpoint_every=3)
    c.run(core.open(["a"], {}))
    for _ in range(7):
        c.run(core.step({"a": [1]}))
    assert [cp for _, cp in c.rows] == [False, False, True, False, False, True, False]
    assert core.session("a").resume_token == b"6"
    c.now += 301  # the newest token is too old: it might expire
    c.run(core.step({"a": [1]}))
    assert c.rows[-1] == (0, True)


def test_a_drain_notice_moves_the_stream_and_a_drain_close_resumes_it():
    c = Cluster()
    core = c.core()
    c.run(core.open(["a", "b"], {}))
    c.run(core.step({"a": [1], "b": [2]}))

    def draining(s: ToyStream, deadline: int = 1) -> pb.MultiplexResponse:
        handles = list(s.sessions)
        tokens = [str(s.sessions[h]).encode() for h in handles]
        return pb.MultiplexResponse(draining=pb.SessionsDraining(handles=handles, resume_tokens=tokens,
                                                                 deadline_unix_ms=deadline))  # fmt: skip

    c.push(0, draining)
    y = c.run(core.step({"a": [1], "b": [2]}))  # moved first: t1 answers
    assert positions([y["a"], y["b"]]) == [1, 1] and core.open_streams() == ["t1:1"]
    c.push(1, lambda s: draining(s, 0))  # t1 closed them for its drain, with their final tokens
    c.push(1, lambda s: pb.MultiplexResponse(closed=pb.SessionsClosed(handles=list(s.sessions),
                                                                       reason=pb.CLOSE_REASON_DRAIN)))  # fmt: skip
    y = c.run(core.step({"a": [1]}))
    assert positions([y["a"]]) == [2] and core.open_streams() == ["t0:1"]


def test_an_idle_close_fails_that_key_on_its_next_use_and_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="cellserve.client")
    c = Cluster()
    core = c.core()
    c.run(core.open(["a", "b"], {}))
    closed = pb.SessionsClosed(handles=[2], steps=[0], reason=pb.CLOSE_REASON_IDLE, message="idle for 1 s")
    c.push(0, lambda s: pb.MultiplexResponse(closed=closed))
    result, errors = c.outcome(core.step({"a": [1], "b": [1]}))
    assert list(result) == ["a"] and isinstance(errors["b"], SessionClosedError) and errors["b"].reason == "idle"
    assert "idle for 1 s" in errors["b"].details and core.keys == ["a"]
    (record,) = [r for r in caplog.records if "cannot go on" in r.getMessage()]
    assert record.levelno == logging.INFO and record.key == "b" and "'b'" in record.getMessage()


def test_with_checkpointing_off_steps_since_the_last_token_are_data_loss_on_a_crash():
    c = Cluster()
    core = c.core(checkpoint_every=0)
    c.run(core.open(["a", "b"], {}))
    c.run(core.step({"a": [1], "b": [1]}))
    c.run(core.snapshot(["a"]))  # a's token is current; b's steps since its (no) token were not kept
    c.kill(0)
    result, errors = c.outcome(core.step({"a": [1], "b": [1]}))
    assert positions([result["a"]]) == [1] and isinstance(errors["b"], DataLossError)
    assert "checkpointing off" in errors["b"].details


def test_a_closed_gateway_takes_no_calls_and_closing_twice_is_fine():
    c = Cluster()
    core = c.core()
    c.run(core.open(["a"], {}))
    c.run(core.shutdown())
    c.run(core.shutdown())
    assert not [s for s in c.streams.values() if s.sessions]  # closed on the server
    with pytest.raises(FailedPreconditionError, match="the gateway is closed"):
        c.run(core.step({"a": [1]}))


def _draining(s: ToyStream) -> pb.MultiplexResponse:
    handles = list(s.sessions)
    tokens = [str(s.sessions[h]).encode() for h in handles]
    return pb.MultiplexResponse(draining=pb.SessionsDraining(handles=handles, resume_tokens=tokens, deadline_unix_ms=1))


def test_a_move_the_other_server_takes_only_in_part_leaves_every_session_on_the_draining_one():
    c = Cluster()
    core = c.core()
    c.run(core.open(["a", "b"], {}))
    c.run(core.step({"a": [1], "b": [1, 2]}))
    c.refuse_tokens.add(b"2")  # t1 would not take b's state
    c.push(0, _draining)
    y = c.run(core.step({"a": [1], "b": [1]}))  # no move: both still on t0, which serves them in its grace
    assert positions([y["a"], y["b"]]) == [1, 2] and core.open_streams() == ["t0:1"]
    assert core.session("b").error is None


def test_an_open_refused_unavailable_on_a_draining_stream_goes_to_another_target():
    c = Cluster()
    core = c.core()
    c.run(core.open(["a"], {}))
    real = c._answer

    def draining_t0(s: ToyStream, req: pb.MultiplexRequest) -> pb.MultiplexResponse:
        if s.target == 0 and req.WhichOneof("kind") == "open":  # t0 drains: it refuses opens, notice not yet sent
            opened = [pb.OpenedSession(key=o.key) for o in req.open.sessions]
            refused = [pb.EntryError(index=i, code=14, message="server is draining") for i in range(len(opened))]
            return pb.MultiplexResponse(seq=req.seq, opened=pb.SessionsOpened(sessions=opened), errors=refused)
        return real(s, req)

    c._answer = draining_t0  # type: ignore[method-assign]
    assert c.run(core.open(["b", "c"], {})) == ["b", "c"]
    assert core.session("b").target == "t1:1" and core.session("a").target == "t0:1"


def test_a_replay_answered_error_as_a_whole_ends_the_recovery_so_a_later_break_resumes_afresh():
    c = Cluster()
    core = c.core(checkpoint_every=8, resume_timeout_s=30)
    c.run(core.open(["a", "c"], {}))
    c.run(core.step({"a": [1], "c": [1]}))
    c.run(core.snapshot(["c"]))  # c has nothing to replay; a one step
    real = c._answer
    failed: list[int] = []

    def refuse_the_replay(s: ToyStream, req: pb.MultiplexRequest) -> pb.MultiplexResponse:
        if s.target == 1 and req.WhichOneof("kind") == "step" and not failed:  # t1's first step: a's replay
            failed.append(req.seq)
            return pb.MultiplexResponse(seq=req.seq, error=pb.StepError(seq=req.seq, code=3, message="too big"))
        return real(s, req)

    c._answer = refuse_the_replay  # type: ignore[method-assign]
    c.kill(0)
    y = c.run(core.step({"c": [2]}))  # resumed on t1: a is lost with its replay, c goes on
    assert failed and positions([y["c"]]) == [1] and isinstance(core.session("a").error, DataLossError)
    c.now += 3600  # long after that resume's deadline
    c.up[0] = True
    c.kill(1)
    y = c.run(core.step({"c": [3]}))  # a new episode: t0 takes c back
    assert positions([y["c"]]) == [2] and core.session("c").target == "t0:1"


def test_a_drain_notice_moves_no_session_whose_steps_since_its_token_were_not_kept():
    """Checkpointing off: a step answered after the notice's token (a call interrupted before it read its answer)
    is in no token; a move would drop it, so the sessions stay on the draining server (which serves them)."""
    c = Cluster()
    core = c.core(checkpoint_every=0)
    c.run(core.open(["a"], {}))
    c.run(core.step({"a": [1]}))
    interrupted = core.step({"a": [2]})
    op = interrupted.send(None)
    while not isinstance(op, SendOn):
        op = interrupted.send(c.perform(op))
    c.push(0, _draining)  # t0 drains between its answers: a's token (1 step), then the answer to [2]
    c.perform(op)
    assert isinstance(interrupted.send(None), ReceiveOn)
    interrupted.close()  # the caller left while it waited for the answer (KeyboardInterrupt, say)
    y = c.run(core.step({"a": [3]}))
    assert positions([y["a"]]) == [2] and core.open_streams() == ["t0:1"]


def test_a_columnar_step_of_no_keys_answers_no_rows_in_the_outputs_layout():
    c = Cluster()
    core = c.core()
    c.run(core.open(["a"], {}))
    sent = len(c.rows)
    y = c.run(core.step_arrays([], np.zeros((0, 3), np.int64)))
    assert y.shape == (0, 3, 1) and y.dtype == np.float32 and len(c.rows) == sent
