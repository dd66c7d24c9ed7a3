"""The asyncio SDK's own lifetime (a real server, loopback, port 0): no reader task left after 500 sessions, a
session used after its client closed, and steps cancelled in flight that leave the session exact."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cellserve.client import AsyncClient
from cellserve.client.errors import CellserveClientError


def test_500_async_sessions_opened_and_closed_leave_no_reader_task_and_no_server_session(running_server) -> None:
    with running_server() as srv:

        async def main() -> None:
            async with AsyncClient(srv.address) as client:
                before = asyncio.all_tasks()
                for i in range(500):
                    async with await client.session("tiny") as s:
                        await s.step([i % 256])
                readers = [t for t in asyncio.all_tasks() - before if t.get_name() == "cellserve-session-reader"]
                if readers:  # the last session's reader sees the end of its stream a moment after close()
                    _, pending = await asyncio.wait(readers, timeout=10)
                    assert not pending, f"{len(pending)} reader tasks still running after close()"

        asyncio.run(main())
        assert not srv.server.sessions.sessions


def test_an_async_session_used_after_its_client_closed_raises_a_client_error_at_once(
    wait_until, running_server
) -> None:
    with running_server() as srv:

        async def main() -> None:
            client = AsyncClient(srv.address)
            s = await client.session("tiny")
            await s.step([1])
            await client.close()
            with pytest.raises(CellserveClientError):
                await asyncio.wait_for(s.step([2]), 10)
            await asyncio.wait_for(s.close(), 10)  # still idempotent and quick

        asyncio.run(main())
        wait_until(lambda: not srv.server.sessions.sessions)  # the cancelled stream freed its slot


@pytest.mark.parametrize("opened", ["async with", "await"])
def test_a_step_cancelled_while_its_request_is_being_written_leaves_the_session_usable(
    running_server, tiny_oracle, opened
):
    """The write is shielded: the call survives; the step still runs (its output is discarded), and
    ``s.steps`` says so once the next step is answered. Both ways of opening a session behave alike."""
    tokens = np.arange(6, dtype=np.int64) * 3 % 256
    with running_server() as srv:

        async def main() -> tuple[list[np.ndarray], int]:
            async with AsyncClient(srv.address) as client:
                session = client.session("tiny")
                async with session if opened == "async with" else await session as s:
                    ys = [await s.step(tokens[:3])]
                    task = asyncio.ensure_future(s.step(tokens[3:4]))
                    await asyncio.sleep(0)  # the step is now inside its write (an event-loop turn, not a timing wait)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    ys += [await s.step(tokens[i : i + 1]) for i in range(4, 6)]  # the cancelled one ran first
                    return ys, s.steps

        ys, steps = asyncio.run(main())
    want = tiny_oracle.sequence(tokens)
    assert steps == 6  # the cancelled step ran (once)
    np.testing.assert_allclose(np.concatenate(ys), np.concatenate([want[:3], want[4:]]), atol=1e-5, rtol=0)
