"""The sync SDK follows a draining server: its session moves to the next target with its state."""

from __future__ import annotations

import asyncio

import numpy as np

from cellserve.client import Client

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
