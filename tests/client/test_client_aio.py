"""asyncio-only behaviour: ``async with client.session(...)``, and pipelined ``send`` + ``async for``
sessions that move on drain and survive a vanished server like ``await s.step`` ones."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from cellserve.client import AsyncClient

KEYS = '{"active": "k", "keys": {"k": "' + "ab" * 32 + '"}}'
TOL = 1e-5


def test_async_with_client_session_works_without_await_and_await_still_works(running_server, tiny_oracle):
    tokens = np.arange(6, dtype=np.int64)

    async def main(address: str) -> list[np.ndarray]:
        async with AsyncClient(address) as client:
            async with client.session("tiny") as s:
                first = await s.step(tokens[:3])
            s2 = await client.session("tiny")
            async with s2:
                second = await s2.step(tokens[:3])
            return [first, second]

    with running_server() as srv:
        first, second = asyncio.run(main(srv.address))
        assert not srv.server.sessions.sessions
    want = tiny_oracle.sequence(tokens[:3])
    np.testing.assert_allclose(first, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(second, want, atol=TOL, rtol=0)


async def _pipelined(s: Any, chunks: list[np.ndarray], midway: Any) -> list[Any]:
    """Feed every chunk from one task, read every output in this one; ``midway()`` runs after half."""

    async def feed() -> None:
        for k, chunk in enumerate(chunks):
            await s.send(chunk)
            if k == len(chunks) // 2:
                await midway()
        await s.end()

    feeder = asyncio.create_task(feed())
    outs = [out async for out in s]
    await feeder
    return outs


@pytest.mark.parametrize("event", ["drain", "vanish"])
def test_a_pipelined_session_moves_on_drain_and_survives_a_vanished_server(running_server, tiny_oracle, event):
    tokens = np.random.default_rng(11).integers(0, 256, size=60, dtype=np.int64)
    chunks = np.split(tokens, np.arange(3, 60, 3))  # 20 messages of 3
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def midway() -> None:
            if event == "drain":
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop))
            else:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(a.server.stop(0), a.loop))

        async def main() -> tuple[list[Any], str]:
            async with (
                AsyncClient([a.address, b.address], checkpoint_every=4) as client,
                client.session("tiny") as s,
            ):
                outs = await asyncio.wait_for(_pipelined(s, chunks, midway), 60)
                return outs, s.target

        outs, target = asyncio.run(main())
        assert target == b.address and not a.server.sessions.sessions
    assert [o.seq for o in outs] == list(range(20))  # each output once, in order
    np.testing.assert_allclose(np.concatenate([o.y for o in outs]), tiny_oracle.sequence(tokens), atol=TOL, rtol=0)
