"""Sessions that outlive their server, through the sync and the asyncio SDK alike (the ``sdk`` fixture):
moves on drain, resumes after a server vanished (from the last checkpoint, replaying the steps since),
the same address again, and the errors when no server can continue the session."""

from __future__ import annotations

import os
import signal
import urllib.request
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from replica_helpers import drain, token_keys

from cellserve.client import DataLossError, UnavailableError

KEYS = token_keys("ab", key_id="k")
OTHER_KEYS = token_keys("cd", key_id="k")
TOL = 1e-5


def vanish(srv: Any) -> None:
    """The server stops at once, without a drain: its streams die under the sessions."""
    srv.call(srv.server.stop(0))


def tokens_of(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.int64)


def test_a_session_moves_to_the_next_target_when_its_server_drains(sdk, running_server, tiny_oracle):
    tokens = tokens_of(4, 30)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        sdk.client([a.address, b.address]) as client,
        client.session("tiny") as s,
    ):
        ys = [s.step(tokens[:10])]
        first_id = s.session_id
        drained = drain(a)
        ys.append(s.step(tokens[10:20]))  # A answers or the session moves first: the same either way
        ys.append(s.step(tokens[20:]))  # answered by B
        assert s.session_id != first_id and s.steps == 30 and s.target == b.address
        drained.result(30)  # A finished draining early: its only session left
        assert b.server.sessions.sessions and not a.server.sessions.sessions
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=TOL, rtol=0)


def test_without_other_targets_a_draining_session_keeps_working_until_closed(sdk, running_server):
    tokens = np.arange(12, dtype=np.int64)
    with running_server(token_keys=KEYS) as a, sdk.client(a.address) as client, client.session("tiny") as s:
        s.step(tokens[:6])
        drained = drain(a)
        y = s.step(tokens[6:])  # still served during the grace period
        assert y.shape == (6, 256) and s.draining and s.resume_token and s.target == a.address
        s.close()
        drained.result(30)


@pytest.mark.parametrize("every", [1, 4, 64])
def test_a_vanished_server_is_invisible_the_session_resumes_and_replays_since_its_checkpoint(
    sdk, running_server, tiny_oracle, every
):
    tokens = tokens_of(6, 40)
    chunks = np.split(tokens, [3, 5, 9, 10, 17, 22, 23, 30, 34])  # 10 messages
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        sdk.client([a.address, b.address], checkpoint_every=every) as client,
        client.session("tiny") as s,
    ):
        ys = [s.step(c) for c in chunks[:6]]  # 6 messages: a checkpoint every `every`, steps since
        vanish(a)
        ys += [s.step(c) for c in chunks[6:]]  # the first one resumes on B: no error, no repeats
        assert s.target == b.address and s.steps == 40
        assert len(b.server.sessions.sessions) == 1
    assert [len(y) for y in ys] == [len(c) for c in chunks]
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=TOL, rtol=0)


def _sessions_on(metrics_port: int) -> float:
    """``cellserve_sessions_active`` of one worker (its own metrics port, from the ready file)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cellserve_sessions_active"
    )


def test_a_session_resumes_on_the_same_address_when_its_worker_is_killed(sdk, spawn_server, tiny_oracle):
    """``serve --workers 2`` on one port: SIGKILL the worker holding the session; the session goes on at the
    same address (a new stream reaches the other worker, or the restarted one)."""
    server = spawn_server("--workers", "2", "--token-keys", KEYS)
    workers = server.ready_info()["workers"]
    tokens = tokens_of(7, 24)
    with sdk.client(server.address, checkpoint_every=4) as client, client.session("tiny") as s:
        ys = [s.step(tokens[i : i + 2]) for i in range(0, 14, 2)]  # a token after 8 steps; 6 answered since
        (holder,) = [w for w in workers if _sessions_on(w["metrics_port"]) == 1]
        os.kill(holder["pid"], signal.SIGKILL)
        ys += [s.step(tokens[i : i + 2]) for i in range(14, 24, 2)]
        assert s.target == server.address and s.steps == 24
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=TOL, rtol=0)


def test_with_every_server_gone_the_caller_gets_unavailable_after_the_resume_timeout(sdk, running_server):
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        sdk.client([a.address, b.address], resume_timeout_s=1) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        vanish(b)
        vanish(a)
        with pytest.raises(UnavailableError, match="no server took the session within 1 s") as err:
            s.step([3])
        assert a.address in err.value.details and b.address in err.value.details
        with pytest.raises(UnavailableError):  # the session is over: every call says so
            s.step([4])


def test_a_token_every_other_server_refuses_is_data_loss_with_each_servers_answer(sdk, running_server):
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=OTHER_KEYS) as b,
        sdk.client([a.address, b.address], resume_timeout_s=1) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        s.snapshot()
        vanish(a)
        with pytest.raises(DataLossError, match="UNAUTHENTICATED") as err:
            s.step([3])
        assert b.address in err.value.details
        assert not b.server.sessions.sessions


def test_a_server_with_another_model_file_under_the_same_name_is_refused(sdk, running_server, tmp_path):
    """Before the first checkpoint the base is "zero state", reopened by name: the SDK checks the file's sha256."""
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path / "v2", name="tiny", layers=2, hidden=32, seed=1)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(model_dirs=[tmp_path / "v2"], token_keys=KEYS) as b,
        sdk.client([a.address, b.address], resume_timeout_s=1) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        vanish(a)
        with pytest.raises(DataLossError, match="another file"):
            s.step([3])


def test_with_checkpointing_off_a_vanished_server_loses_the_session_unless_its_token_is_current(
    sdk, running_server, tiny_oracle
):
    tokens = tokens_of(8, 20)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        running_server(token_keys=KEYS) as c,
        sdk.client([a.address, b.address, c.address], checkpoint_every=0) as client,
        client.session("tiny") as s,
    ):
        assert s.checkpoint_every == 0
        ys = [s.step(tokens[:8])]
        s.snapshot()  # current: nothing is answered after it
        vanish(a)
        ys.append(s.step(tokens[8:14]))  # resumed on B from the snapshot
        assert s.steps == 14 and s.target == b.address
        ys.append(s.step(tokens[14:17]))  # answered after the last token, and not kept
        vanish(b)
        with pytest.raises(DataLossError, match=r"9 steps were answered after .*\(at step 8\) with checkpointing"):
            s.step(tokens[17:])
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens[:17]), atol=TOL, rtol=0)


def test_a_move_that_finds_no_taker_keeps_the_session_on_the_draining_server(sdk, running_server, tiny_oracle):
    tokens = np.arange(6, dtype=np.int64) * 5 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        vanish(b)  # the only other replica is already gone
        with sdk.client([a.address, b.address]) as client, client.session("tiny") as s:
            ys = [s.step(tokens[:3])]
            drained = drain(a)
            ys.append(s.step(tokens[3:4]))
            ys.append(s.step(tokens[4:]))  # A still serves it during its grace
            assert s.target == a.address
        drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=TOL, rtol=0)


def test_a_session_outlives_connection_age_goaways_by_resuming_on_the_same_address(sdk, running_server, tiny_oracle):
    """``max_connection_age_s`` ends a connection's streams after its grace: the session comes back at once."""
    rng = np.random.default_rng(9)
    with (
        running_server(token_keys=KEYS, max_connection_age_s=0.3, max_connection_age_grace_s=0.3) as srv,
        sdk.client(srv.address, checkpoint_every=4) as client,
        client.session("tiny") as s,
    ):
        sent, ys, ids = [], [], {s.session_id}
        while len(ids) < 3 and len(sent) < 5000:  # until it has resumed twice (bounded)
            sent.append(rng.integers(0, 256, size=2, dtype=np.int64))
            ys.append(s.step(sent[-1]))
            ids.add(s.session_id)
        assert len(ids) == 3, f"no resume after {len(sent)} steps"
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(np.concatenate(sent)), atol=TOL, rtol=0)
