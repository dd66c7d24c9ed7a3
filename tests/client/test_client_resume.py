"""The sync SDK follows a draining server: its session moves to the next target with its state."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cellserve.client import AsyncClient, Client, DataLossError

KEYS = '{"active": "k", "keys": {"k": "' + "ab" * 32 + '"}}'


def test_session_moves_to_the_next_target_when_its_server_drains(running_server, tiny_oracle):
    tokens = np.random.default_rng(4).integers(0, 256, size=30, dtype=np.int64)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address]) as client,
        client.session("tiny") as s,
    ):
        ys = [s.step(tokens[:10])]
        first_id = s.session_id
        drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
        ys.append(s.step(tokens[10:20]))  # answered by A; then the SDK moves the session to B
        ys.append(s.step(tokens[20:]))  # answered by B
        assert s.session_id != first_id and s.steps == 30
        drained.result(30)  # A finished draining early: its only session left
        assert b.server.sessions.sessions  # the session now lives on B
        assert not a.server.sessions.sessions
    h, c = tiny_oracle.init_state(1)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.run(tokens[None], h, c)[0][0], atol=1e-5, rtol=0)


def test_without_other_targets_a_draining_session_keeps_working_until_closed(running_server, tiny_oracle):
    tokens = np.arange(12, dtype=np.int64)
    with running_server(token_keys=KEYS) as a, Client(a.address) as client, client.session("tiny") as s:
        s.step(tokens[:6])
        drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
        y = s.step(tokens[6:])  # still served during the grace period
        assert y.shape == (6, 256) and s.state.draining and s.state.resume_token
        s.close()
        drained.result(30)


def test_async_session_moves_to_the_next_target_when_its_server_drains(running_server, tiny_oracle):
    tokens = np.random.default_rng(5).integers(0, 256, size=30, dtype=np.int64)
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> list[np.ndarray]:
            async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                ys = [await s.step(tokens[:10])]
                first_id = s.session_id
                drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
                ys.append(await s.step(tokens[10:20]))  # answered by A; then the session moves to B
                ys.append(await s.step(tokens[20:]))  # answered by B
                assert s.session_id != first_id and s.steps == 30
                await asyncio.wrap_future(drained)
                assert b.server.sessions.sessions and not a.server.sessions.sessions
            return ys

        ys = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_vanished_server_resumes_from_the_last_snapshot_only_when_no_step_is_lost(running_server, tiny_oracle, api):
    tokens = np.random.default_rng(6).integers(0, 256, size=20, dtype=np.int64)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        running_server(token_keys=KEYS) as c,
    ):

        def vanish(srv) -> None:
            srv.call(srv.server.stop(0))

        async def run_async() -> tuple[list[np.ndarray], type[Exception]]:
            async with AsyncClient([a.address, b.address, c.address]) as client, await client.session("tiny") as s:
                ys = [await s.step(tokens[:8])]
                await s.snapshot()
                vanish(a)  # gone without draining: the snapshot is current, so the step is retried on B
                ys.append(await s.step(tokens[8:14]))
                assert s.steps == 14
                await s.snapshot()
                ys.append(await s.step(tokens[14:17]))  # a step after the last snapshot ...
                vanish(b)
                with pytest.raises(DataLossError) as err:  # ... would be lost: refused, not silently wrong
                    await s.step(tokens[17:])
                return ys, type(err.value)

        if api == "async":
            ys, _ = asyncio.run(run_async())
        else:
            with Client([a.address, b.address, c.address]) as client, client.session("tiny") as s:
                ys = [s.step(tokens[:8])]
                s.snapshot()
                vanish(a)
                ys.append(s.step(tokens[8:14]))
                assert s.steps == 14
                s.snapshot()
                ys.append(s.step(tokens[14:17]))
                vanish(b)
                with pytest.raises(DataLossError, match="after 14 steps but this session had 17 answered"):
                    s.step(tokens[17:])
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens[:17]), atol=1e-5, rtol=0)
