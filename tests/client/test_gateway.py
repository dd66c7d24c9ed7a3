"""Gateways against real servers, through the sync ``Client`` and the ``AsyncClient`` alike (the ``sdk`` fixture):
mapping and array layouts equal the numpy oracle, a bad entry fails alone, opens beyond capacity, idle expiry per
key, snapshots and resume tokens, the streams a gateway opens, and a drain that moves every session."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from replica_helpers import drain, token_keys

from cellserve.client import (
    AsyncClient,
    ChannelConfig,
    Client,
    GatewayError,
    InvalidInputError,
    ResourceExhaustedError,
    SessionClosedError,
)
from cellserve.client.errors import AlreadyExistsError

KEYS = token_keys("5a", key_id="g")
TOL = 1e-5


def tokens_of(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.int64)


def test_mapping_and_arrays_come_back_in_their_layout_equal_to_the_oracle(sdk, running_server, tiny_oracle):
    keys = [f"call-{i}" for i in range(6)]
    sent: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    got: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with running_server() as srv, sdk.client(srv.address) as client, client.gateway("tiny", keys=keys) as gw:
        assert gw.keys == keys and len(gw) == 6 and "call-0" in gw
        for r, t in enumerate([3, 1, 4]):  # columnar: [N, T] in, [N, T, 256] out, row i for keys[i]
            order = keys[r:] + keys[:r]
            x = tokens_of(r, len(order), t)
            y = gw.step_arrays(order, x)
            assert y.shape == (6, t, 256) and y.dtype == np.float32
            for i, key in enumerate(order):
                sent[key].append(x[i])
                got[key].append(y[i])
        chunks = {k: tokens_of(10 + i, 1 + i % 3) for i, k in enumerate(keys[:4])}  # each key its own T
        chunks["call-4"] = np.int64(7)  # one step without its T axis
        ys = gw.step(chunks)
        assert list(ys) == list(chunks)
        for key, x in chunks.items():
            x = np.atleast_1d(x)
            assert ys[key].shape == (len(x), 256)
            sent[key].append(x)
            got[key].append(ys[key])
        assert gw.session("call-2").steps == 8 + 3 and gw.session("call-5").steps == 8
        assert gw.streams == [srv.address]
    for key in keys:
        want = tiny_oracle.sequence(np.concatenate(sent[key]))
        np.testing.assert_allclose(np.concatenate(got[key]), want, atol=TOL, rtol=0, err_msg=key)


def test_a_bad_row_fails_alone_and_its_session_goes_on_unchanged(sdk, running_server, tiny_oracle):
    keys = ["a", "b", "c"]
    with running_server() as srv, sdk.client(srv.address) as client, client.gateway("tiny", keys=keys) as gw:
        first = gw.step_arrays(keys, [[1, 2], [3, 4], [5, 6]])
        x = np.array([[7, 8], [9, 300], [11, 12]])  # b's row: a token id out of range
        with pytest.raises(GatewayError) as failed:
            gw.step_arrays(keys, x)
        (error,) = failed.value.errors.values()
        assert list(failed.value.errors) == ["b"] and isinstance(error, InvalidInputError)
        assert "token id 300 is out of range" in error.details and "'b'" in str(failed.value)
        partial = failed.value.result
        assert partial.shape == (3, 2, 256) and not partial[1].any()
        with pytest.raises(GatewayError) as failed:  # the mapping layout: the others' outputs by key
            gw.step({"a": [13], "b": [-1], "c": [14]})
        assert list(failed.value.errors) == ["b"] and sorted(failed.value.result) == ["a", "c"]
        last = gw.step({"a": [15], "b": [16], "c": [17]})
        assert gw.session("b").steps == 3  # the refused rows left no trace
    np.testing.assert_allclose(first[1], tiny_oracle.sequence([3, 4]), atol=TOL, rtol=0)
    np.testing.assert_allclose(last["b"][0], tiny_oracle.sequence([3, 4, 16])[-1], atol=TOL, rtol=0)
    np.testing.assert_allclose(partial[0], tiny_oracle.sequence([1, 2, 7, 8])[2:], atol=TOL, rtol=0)
    np.testing.assert_allclose(failed.value.result["c"][0], tiny_oracle.sequence([5, 6, 11, 12, 14])[-1], atol=TOL,
                               rtol=0)  # fmt: skip


def test_opens_beyond_capacity_fail_per_key_and_the_others_open(sdk, running_server):
    with running_server(capacity=3) as srv, sdk.client(srv.address) as client, client.gateway("tiny") as gw:
        with pytest.raises(GatewayError) as failed:
            gw.open(["k0", "k1", "k2", "k3", "k4"])
        assert failed.value.result == ["k0", "k1", "k2"] and gw.keys == ["k0", "k1", "k2"]
        assert list(failed.value.errors) == ["k3", "k4"]
        assert all(isinstance(e, ResourceExhaustedError) for e in failed.value.errors.values())
        assert gw.step({k: [1] for k in gw.keys}).keys() == {"k0", "k1", "k2"}
        gw.close(["k2"])
        assert gw.open(["k3"]) == ["k3"]  # the slot k2 freed
        with pytest.raises(GatewayError) as again:
            gw.open(["k3"])
        assert isinstance(again.value.errors["k3"], AlreadyExistsError)


def test_an_idle_expiry_fails_that_key_alone_and_is_logged_with_the_key(sdk, running_server, caplog, wait_until):
    caplog.set_level(logging.INFO, logger="cellserve.client")
    with (
        running_server() as srv,
        sdk.client(srv.address) as client,
        client.gateway("tiny", keys=["busy", "quiet"], idle_timeout_s=1) as gw,
    ):
        gw.step({"busy": [1], "quiet": [2]})
        idle = {"model": "tiny", "reason": "idle"}

        def quiet_expired() -> bool:  # busy keeps stepping, quiet runs out its idle timeout
            gw.step({"busy": [3]})
            return bool(srv.registry.get_sample_value("cellserve_sessions_closed_total", idle))

        wait_until(quiet_expired, 15, poll_s=0.2, what="the server to expire the quiet session")
        with pytest.raises(GatewayError) as failed:
            gw.step({"busy": [4], "quiet": [5]})
        closed = failed.value.errors["quiet"]
        assert isinstance(closed, SessionClosedError) and closed.reason == "idle"
        assert list(failed.value.result) == ["busy"]
        assert gw.keys == ["busy"] and gw.session("quiet").error is closed
        with pytest.raises(GatewayError):  # and on every later use
            gw.snapshot(["quiet"])
        gw.close(["quiet"])
        assert gw.open(["quiet"]) == ["quiet"]  # a new session under the same key
    (record,) = [r for r in caplog.records if "cannot go on" in r.getMessage()]
    assert record.levelno == logging.INFO and record.key == "quiet" and record.reason == "idle"


def test_snapshot_tokens_resume_in_another_gateway(sdk, running_server, tiny_oracle):
    x = tokens_of(3, 4, 5)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        sdk.client(a.address) as ca,
        sdk.client(b.address) as cb,
    ):
        with ca.gateway("tiny", keys=["w", "x", "y", "z"]) as gw:
            gw.step_arrays(["w", "x", "y", "z"], x[:, :3])
            tokens = gw.snapshot()
            assert list(tokens) == ["w", "x", "y", "z"] and gw.session("x").resume_token == tokens["x"]
        with cb.gateway("tiny") as gw:
            assert gw.open(["z", "x"], resume_tokens=tokens) == ["z", "x"]
            assert gw.session("z").steps == 3
            y = gw.step_arrays(["x", "z"], x[[1, 3], 3:])
    np.testing.assert_allclose(y[0], tiny_oracle.sequence(x[1])[3:], atol=TOL, rtol=0)
    np.testing.assert_allclose(y[1], tiny_oracle.sequence(x[3])[3:], atol=TOL, rtol=0)


def test_sessions_past_a_streams_limit_go_on_more_streams(sdk, running_server, tiny_oracle):
    keys = [f"d{i}" for i in range(10)]
    with (
        running_server() as srv,
        sdk.client(srv.address) as client,
        client.gateway("tiny", keys=keys, sessions_per_stream=4) as gw,
    ):
        assert len(gw.streams) == 3  # 4 + 4 + 2
        x = tokens_of(5, 10, 2)
        y = gw.step_arrays(keys[::-1], x)
        gw.close(keys[:4])
        gw.open(["e0", "e1"])  # into the room the closes left, no new stream
        assert len(gw.streams) == 3
    for i, key in enumerate(keys[::-1]):
        np.testing.assert_allclose(y[i], tiny_oracle.sequence(x[i]), atol=TOL, rtol=0, err_msg=key)


def test_calls_name_sessions_by_known_distinct_keys(sdk, running_server):
    with running_server() as srv, sdk.client(srv.address) as client, client.gateway("tiny", keys=["a"]) as gw:
        with pytest.raises(KeyError, match="no session 'nope' in this gateway"):
            gw.step({"nope": [1]})
        with pytest.raises(ValueError, match="key 'a' is given twice"):
            gw.step_arrays(["a", "a"], [[1], [2]])
        with pytest.raises(InvalidInputError, match=r"inputs have shape \[2, 1\]; 1 keys take one \[1, T\]"):
            gw.step_arrays(["a"], [[1], [2]])
        assert gw.step({"a": [1]})["a"].shape == (1, 256)


def test_a_drain_moves_every_session_to_the_other_server(sdk, running_server, tiny_oracle, caplog):
    caplog.set_level(logging.INFO, logger="cellserve.client")
    keys = [f"m{i}" for i in range(20)]
    x = tokens_of(9, 20, 9)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        sdk.client([a.address, b.address], checkpoint_every=2) as client,
        client.gateway("tiny", keys=keys, sessions_per_stream=8) as gw,
    ):
        ys = [gw.step_arrays(keys, x[:, :3])]
        drained = drain(a)
        ys.append(gw.step_arrays(keys, x[:, 3:5]))  # A answers, or the streams move first: the same either way
        ys.append(gw.step_arrays(keys, x[:, 5:]))
        assert {gw.session(k).target for k in keys} == {b.address} and gw.streams == [b.address] * 3
        drained.result(30)  # A finished its drain early: no session left on it
        assert len(b.server.sessions.sessions) == 20 and not a.server.sessions.sessions
    assert len([r for r in caplog.records if r.getMessage() == "gateway stream moved off a draining server"]) == 3
    want = tiny_oracle.run(x)[0]
    np.testing.assert_allclose(np.concatenate(ys, axis=1), want, atol=TOL, rtol=0)


def test_an_asyncio_caller_cancelled_mid_step_leaves_the_gateway_exact(running_server, tiny_oracle):
    async def main(address: str) -> tuple[np.ndarray, np.ndarray]:
        async with AsyncClient(address) as client, client.gateway("tiny", keys=["p", "q"]) as gw:
            first = asyncio.create_task(gw.step_arrays(["p", "q"], [[1, 2], [3, 4]]))
            second = asyncio.create_task(gw.step_arrays(["p", "q"], [[5], [6]]))  # queued behind the first
            await asyncio.sleep(0)
            first.cancel()  # the caller stops waiting; the step itself still runs, once
            with pytest.raises(asyncio.CancelledError):
                await first
            y = await second
            return y, (await gw.step({"p": [7]}))["p"]

    with running_server() as srv:
        y, last = asyncio.run(main(srv.address))
    np.testing.assert_allclose(y[1], tiny_oracle.sequence([3, 4, 6])[2:], atol=TOL, rtol=0)
    np.testing.assert_allclose(last, tiny_oracle.sequence([1, 2, 5, 7])[3:], atol=TOL, rtol=0)


def test_a_gateways_streams_spread_over_the_clients_connections(sdk, running_server, tiny_oracle):
    keys = [f"s{i}" for i in range(12)]
    with (
        running_server() as srv,
        sdk.client(srv.address, ChannelConfig(connections_per_target=4)) as client,
        client.gateway("tiny", keys=keys, streams=4) as gw,
    ):
        inner = getattr(client, "aio", client)
        assert inner._channels.pool(srv.address).open_streams() == [1, 1, 1, 1]  # a stream on each connection
        assert [len(lane.members) for lane in gw._core.lanes] == [3, 3, 3, 3]  # the sessions spread over them
        y = gw.step_arrays(keys, np.arange(24).reshape(12, 2))  # one request per stream, the answer in key order
    for i in (0, 5, 11):
        np.testing.assert_allclose(y[i], tiny_oracle.sequence([2 * i, 2 * i + 1]), atol=TOL, rtol=0)


def _sessions_on(metrics_port: int) -> float:
    """``cellserve_sessions_active`` of one worker (its own metrics port, from the ready file)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "cellserve_sessions_active")  # fmt: skip


def test_one_gateways_sessions_reach_every_worker_behind_an_address(sdk, spawn_server):
    """``serve --workers 2``: 16 streams take 16 connections of the pool, 8 on each worker (the pool asks each
    connection its worker; the kernel's hash alone gives 8:8 about 1 time in 5)."""
    server = spawn_server("--workers", "2")
    workers = server.ready_info()["workers"]
    keys = [f"w{i}" for i in range(32)]
    with sdk.client(server.address) as client, client.gateway("tiny", keys=keys, streams=16) as gw:
        assert len(gw.streams) == 16
        gw.step_arrays(keys, np.ones((32, 1), np.int64))
        per_worker = [_sessions_on(w["metrics_port"]) for w in workers]
    assert per_worker == [16, 16], per_worker


def test_a_server_whose_streams_hold_fewer_sessions_gets_more_streams(sdk, running_server, tiny_oracle):
    keys = [f"f{i}" for i in range(11)]
    with (
        running_server(max_sessions_per_stream=3) as srv,
        sdk.client(srv.address) as client,
        client.gateway("tiny", keys=keys) as gw,  # sessions_per_stream 256: the server's limit decides
    ):
        assert len(gw.streams) == 4 and gw.keys == keys
        y = gw.step_arrays(keys, np.arange(11).reshape(11, 1))
    np.testing.assert_allclose(y[10], tiny_oracle.sequence([10]), atol=TOL, rtol=0)


def test_a_step_whose_answer_passes_the_servers_message_limit_is_split_not_refused(sdk, running_server, tiny_oracle):
    """Both sides' defaults: 64 sessions x T=80 x 1 KiB of logits is a 5 MiB answer, past the server's 4 MiB limit
    (within the client's 16 MiB): sent as one request, the server would refuse it whole and every key would fail."""
    keys = [f"big{i}" for i in range(64)]
    x = tokens_of(11, 64, 80)
    with running_server() as srv, sdk.client(srv.address) as client, client.gateway("tiny", keys=keys) as gw:
        y = gw.step_arrays(keys, x)
    assert y.shape == (64, 80, 256)
    for i in (0, 63):
        np.testing.assert_allclose(y[i], tiny_oracle.sequence(x[i]), atol=TOL, rtol=0, err_msg=keys[i])


def test_a_server_with_a_smaller_message_limit_says_so_and_the_gateway_sizes_its_requests_by_it(
    sdk, running_server, tiny_oracle
):
    """A server at 64 KiB: its ModelInfo says so, and 40 sessions x T=2 (an 80 KiB answer) go as several requests
    instead of one the server would refuse whole."""
    keys = [f"k{i}" for i in range(40)]
    x = tokens_of(12, 40, 2)
    with (
        running_server(max_message_bytes=64 * 1024) as srv,
        sdk.client(srv.address) as client,
        client.gateway("tiny", keys=keys) as gw,
    ):
        y = gw.step_arrays(keys, x)
        with Client(srv.address) as plain:
            assert plain.model_info("tiny").max_message_bytes == 64 * 1024
    for i in (0, 39):
        np.testing.assert_allclose(y[i], tiny_oracle.sequence(x[i]), atol=TOL, rtol=0, err_msg=keys[i])
