"""200 sessions of one SDK gateway outlive their server: SIGKILL (no drain) or SIGTERM (drain) of replica A.

Two real ``cellserve serve`` processes share token keys. One gateway (sync ``Client`` or ``AsyncClient``) holds 200
sessions on A over four streams, and steps them in rounds: columnar ``step_arrays`` and ``step`` of a mapping
whose keys each take their own T, checkpointing every 3 steps of a session. After 4 rounds A is killed (or
drained), and 6 more rounds run. Every session must finish on B with outputs equal to the numpy oracle over
its whole sequence, and no exception may reach the caller.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from replica_helpers import token_keys

from cellserve.client import AsyncClient, Client

KEYS = token_keys("6b", key_id="gw")
SESSIONS, BEFORE, AFTER = 200, 4, 6
GATEWAY = {"sessions_per_stream": 64, "streams": 2}  # 64 + 64 + 64 + 8 sessions: four streams
TOL = 1e-5


class Rounds:
    """The inputs each key was sent and the outputs it got, in order; round ``r``'s inputs from a seeded rng."""

    def __init__(self, keys: list[str], seed: int) -> None:
        self.keys = keys
        self.rng = np.random.default_rng(seed)
        self.sent: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        self.got: dict[str, list[np.ndarray]] = {k: [] for k in keys}

    def call(self, r: int) -> tuple[str, tuple]:
        """Round ``r``'s call: even rounds columnar (keys shuffled, one T), odd ones a mapping of 3/4 of the keys."""
        if r % 2 == 0:
            order = [self.keys[i] for i in self.rng.permutation(len(self.keys))]
            x = self.rng.integers(0, 256, size=(len(order), int(self.rng.integers(1, 4))), dtype=np.int64)
            return "step_arrays", (order, x)
        chosen = [k for k in self.keys if self.rng.random() < 0.75]
        return "step", ({k: self.rng.integers(0, 256, size=int(self.rng.integers(1, 4))) for k in chosen},)

    def record(self, method: str, args: tuple, result: Any) -> None:
        if method == "step_arrays":
            order, x = args
            assert result.shape[:2] == x.shape
            pairs = [(k, x[i], result[i]) for i, k in enumerate(order)]
        else:
            (inputs,) = args
            assert list(result) == list(inputs)
            pairs = [(k, inputs[k], result[k]) for k in inputs]
        for key, x, y in pairs:
            self.sent[key].append(x)
            self.got[key].append(y)

    def check(self, oracle: Any) -> None:
        for key in self.keys:
            want = oracle.sequence(np.concatenate(self.sent[key]))
            np.testing.assert_allclose(np.concatenate(self.got[key]), want, atol=TOL, rtol=0, err_msg=key)


def _sync_run(targets: list[str], rounds: Rounds, stop_a: Callable[[], None]) -> list[str]:
    with Client(targets, checkpoint_every=3) as client, client.gateway("tiny", keys=rounds.keys, **GATEWAY) as gw:
        assert len(gw.streams) == 4 and set(gw.streams) == {targets[0]}
        for r in range(BEFORE + AFTER):
            if r == BEFORE:
                stop_a()
            method, args = rounds.call(r)
            rounds.record(method, args, getattr(gw, method)(*args))
        assert len(gw.keys) == SESSIONS
        return [gw.session(k).target for k in rounds.keys]


def _async_run(targets: list[str], rounds: Rounds, stop_a: Callable[[], None]) -> list[str]:
    async def main() -> list[str]:
        async with (
            AsyncClient(targets, checkpoint_every=3) as client,
            client.gateway("tiny", keys=rounds.keys, **GATEWAY) as gw,
        ):
            assert len(gw.streams) == 4 and set(gw.streams) == {targets[0]}
            for r in range(BEFORE + AFTER):
                if r == BEFORE:
                    await asyncio.to_thread(stop_a)
                method, args = rounds.call(r)
                step: Callable[..., Awaitable[Any]] = getattr(gw, method)
                rounds.record(method, args, await step(*args))
            assert len(gw.keys) == SESSIONS
            return [gw.session(k).target for k in rounds.keys]

    return asyncio.run(asyncio.wait_for(main(), 240))


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_200_gateway_sessions_on_a_killed_or_drained_server_all_finish_on_the_other_exactly(
    spawn_server, tiny_oracle, caplog, wait_until, sig, api
):
    caplog.set_level(logging.INFO, logger="cellserve.client")
    a = spawn_server("--token-keys", KEYS, "--grace-s", "60")
    b = spawn_server("--token-keys", KEYS)
    rounds = Rounds([f"agent-{i}" for i in range(SESSIONS)], seed=[int(sig), api == "sync"])

    def stop_a() -> None:
        a.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            a.proc.wait(30)  # gone: the next call finds every stream broken
        else:  # draining: every session has been sent its token (the server notifies them as the drain begins)
            with Client(a.address) as probe:
                wait_until(lambda: probe.health() == "NOT_SERVING", 30, what="A to begin its drain")

    run = _sync_run if api == "sync" else _async_run
    targets = run([a.address, b.address], rounds, stop_a)
    assert set(targets) == {b.address}
    rounds.check(tiny_oracle)
    messages = [r.getMessage() for r in caplog.records]
    lost = [m for m in messages if "cannot go on" in m]
    assert not lost, lost[:3]
    if sig == signal.SIGKILL:  # each stream came back from its sessions' checkpoints, replaying the steps since
        resumed = [r for r in caplog.records if r.getMessage() == "gateway sessions resumed"]
        assert len(resumed) == 4 and sum(r.sessions for r in resumed) == SESSIONS
        assert sum(r.replayed for r in resumed) > 0
    else:  # every stream moved on its server's `draining` notice
        assert messages.count("gateway stream moved off a draining server") == 4
        assert a.proc.wait(timeout=30) == 0
