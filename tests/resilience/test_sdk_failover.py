"""The SDK when its server is gone or refuses the session (real servers, loopback, port 0): every server gone,
an expired snapshot, the new server dying after a move, new sessions skipping a drained target."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from replica_helpers import drain, open_stream, token_keys

from cellserve.client import AsyncClient, Client, DataLossError, UnavailableError

KEYS = token_keys("3c")


def test_sync_session_whose_every_server_is_gone_raises_unavailable(running_server) -> None:
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address], resume_timeout_s=2) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        s.snapshot()
        b.call(b.server.stop(0))
        a.call(a.server.stop(0))
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="no server took the session within 2 s"):
            s.step([3])
        assert time.monotonic() - start < 20


def test_async_session_whose_every_server_is_gone_raises_unavailable(running_server) -> None:
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> None:
            async with AsyncClient([a.address, b.address], resume_timeout_s=2) as client, client.session("tiny") as s:
                await s.step([1, 2])
                await s.snapshot()
                b.call(b.server.stop(0))
                a.call(a.server.stop(0))
                with pytest.raises(UnavailableError, match="no server took the session within 2 s"):
                    await asyncio.wait_for(s.step([3]), 20)

        asyncio.run(main())


def test_resume_refuses_an_expired_snapshot_instead_of_continuing_wrongly(wait_until, running_server) -> None:
    with (
        running_server(token_keys=KEYS, token_ttl_s=1) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address], resume_timeout_s=2) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        token = s.snapshot()
        with grpc.insecure_channel(b.address) as ch:
            wait_until(lambda: open_stream(ch, token)[0] != grpc.StatusCode.OK, timeout_s=10)
        a.call(a.server.stop(0))
        with pytest.raises(DataLossError, match="expired"):  # every other server refused the token: final
            s.step([3])
        assert not b.server.sessions.sessions


def test_a_session_whose_new_server_dies_after_the_move_raises_unavailable_not_a_wrong_output(running_server):
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> None:
            async with AsyncClient([a.address, b.address], resume_timeout_s=2) as client, client.session("tiny") as s:
                await s.step([1, 2, 3])
                drained = drain(a)
                await s.step([4])  # moves to B, then A has no session left and stops
                await asyncio.wrap_future(drained)
                assert b.server.sessions.sessions
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(b.server.stop(0), b.loop))
                with pytest.raises(UnavailableError):
                    await asyncio.wait_for(s.step([5]), 30)

        asyncio.run(main())


@pytest.mark.parametrize("api", ["sync", "async"])
def test_new_sessions_open_on_the_next_target_when_the_first_is_draining_or_gone(running_server, api):
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        drain(a, 5).result(30)  # A drained and stopped
        if api == "sync":
            with Client([a.address, b.address]) as client, client.session("tiny") as s:
                assert s.step([1]).shape == (1, 256)
        else:

            async def main() -> None:
                async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                    assert (await s.step([1])).shape == (1, 256)

            asyncio.run(main())
        assert not b.server.sessions.sessions

