"""A client's connections to one address: sessions spread over a pool of its own TCP connections (so that
they reach every ``--workers`` process behind it), a resume may take any of them, and 1 is one shared
connection. Which worker each connection reaches is tested in tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import numpy as np
import pytest
from replica_helpers import token_keys

from cellserve.client import AsyncClient, ChannelConfig, Client, FailedPreconditionError
from cellserve.client.channel import DEFAULT_CONNECTIONS_PER_TARGET
from cellserve.client.connection_pool import ConnectionPool


def _open_streams(client: Any, address: str) -> list[int]:
    inner = getattr(client, "aio", client)  # the sdk fixture's blocking view of an AsyncClient
    return inner._channels.pool(address).open_streams()


def test_the_default_pool_has_several_connections_each_its_own():
    config = ChannelConfig()
    assert DEFAULT_CONNECTIONS_PER_TARGET > 1 and config.connections_per_target == DEFAULT_CONNECTIONS_PER_TARGET
    assert ("grpc.use_local_subchannel_pool", 1) in config.options()  # else gRPC shares one per process
    assert ("grpc.use_local_subchannel_pool", 1) not in ChannelConfig(connections_per_target=1).options()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_connections_per_target_must_be_a_whole_number_of_at_least_one(bad):
    with pytest.raises(ValueError, match="connections_per_target"):
        ChannelConfig(connections_per_target=bad)


def test_sessions_of_one_client_spread_evenly_over_its_connections(sdk, running_server, tiny_oracle, wait_until):
    tokens = np.arange(1, 4, dtype=np.int64)
    with running_server() as srv, sdk.client(srv.address, ChannelConfig(connections_per_target=4)) as client:
        sessions = [client.session("tiny") for _ in range(8)]
        assert _open_streams(client, srv.address) == [2, 2, 2, 2]
        for s in sessions:
            np.testing.assert_allclose(s.step(tokens), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)
        for s in sessions[:3]:
            s.close()
        freed = lambda: _open_streams(client, srv.address) == [1, 1, 1, 2]  # noqa: E731
        wait_until(freed, timeout_s=10, what="closed streams free their places")
        sessions += [client.session("tiny") for _ in range(3)]
        assert _open_streams(client, srv.address) == [2, 2, 2, 2]  # new ones fill the least-loaded
        for s in sessions[3:]:
            s.close()


def test_with_one_connection_every_session_shares_it(sdk, running_server):
    with running_server() as srv, sdk.client(srv.address, ChannelConfig(connections_per_target=1)) as client:
        sessions = [client.session("tiny") for _ in range(3)]
        assert _open_streams(client, srv.address) == [3]
        for s in sessions:
            s.close()


def test_a_resume_takes_any_connection_of_the_address(sdk, spawn_server, tiny_oracle, wait_until):
    """The server restarts on the same port: every connection of the pool broke; the sessions resume on
    whichever the pool gives them and continue exactly."""
    keys = token_keys("ab", key_id="k")
    first = spawn_server("--token-keys", keys)
    tokens = np.random.default_rng(3).integers(0, 256, size=8, dtype=np.int64)
    config = ChannelConfig(connections_per_target=2)
    with sdk.client(first.address, config, checkpoint_every=1, resume_timeout_s=30) as client:
        sessions = [client.session("tiny") for _ in range(3)]
        ys = [[s.step(tokens[:4])] for s in sessions]
        first.proc.kill()
        first.proc.wait(10)
        second = spawn_server("--port", str(first.port), "--token-keys", keys)
        for s, y in zip(sessions, ys, strict=True):
            y.append(s.step(tokens[4:]))
            assert s.target == second.address and s.steps == 8
        wait_until(lambda: sum(_open_streams(client, first.address)) == 3, timeout_s=10, what="the dead streams done")
        for s in sessions:
            s.close()
    for y in ys:
        np.testing.assert_allclose(np.concatenate(y), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_unary_calls_use_the_first_connection_and_open_no_others(running_server):
    with running_server() as srv, Client(srv.address) as client:
        client.list_models()
        assert client.health() == "SERVING"
        assert len(client._channels.pool(srv.address).channels()) == 1


def test_the_pool_counts_a_stream_until_it_is_done_from_many_threads():
    """Sessions open from many threads and gRPC ends calls on its own: the counts stay exact."""

    class Call:
        def __init__(self) -> None:
            self.callbacks: list[Any] = []

        def add_done_callback(self, fn: Any) -> None:
            self.callbacks.append(fn)

        def finish(self) -> None:
            for fn in self.callbacks:
                fn(self)

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.OK

    class Stub:
        def Stream(self) -> Call:
            return Call()

    pool: ConnectionPool[object] = ConnectionPool("t:1", 3, lambda target: object())
    pool.stub = lambda index=0: Stub()  # type: ignore[method-assign]
    calls: list[Call] = []
    lock = threading.Lock()

    def start(n: int) -> None:
        for _ in range(n):
            call = pool.start("Stream")
            with lock:
                calls.append(call)

    threads = [threading.Thread(target=start, args=(50,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.open_streams() == [100, 100, 100]
    for call in calls:
        call.finish()
    assert pool.open_streams() == [0, 0, 0]


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_closed_client_opens_no_new_connections(running_server, api):
    with running_server() as srv:
        if api == "sync":
            client = Client(srv.address)
            client.close()
            with pytest.raises(FailedPreconditionError, match="client is closed"):
                client.session("tiny")
        else:

            async def main() -> None:
                client = AsyncClient(srv.address)
                await client.close()
                with pytest.raises(FailedPreconditionError, match="client is closed"):
                    await client.session("tiny")

            asyncio.run(main())
