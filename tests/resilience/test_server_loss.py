"""50 SDK sessions outlive their server: SIGKILL (no drain) or SIGTERM (drain) of replica A mid-run.

Two real ``cellserve serve`` processes share token keys. 50 sessions step random chunks on A:
20 sync sessions from 4 threads, 15 asyncio ``await s.step`` and 15 asyncio pipelined (``send`` +
``async for``). Once every session is under way, A is killed (or drained) while they keep stepping;
each then takes 8 more chunks. Every session must finish on B with outputs equal to the numpy oracle
run over the whole sequence, and no exception may reach the caller.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from cellserve.client import AsyncClient, Client

KEYS = '{"active": "k1", "keys": {"k1": "' + "7e" * 32 + '"}}'
SYNC_THREADS, SYNC_PER_THREAD, AWAITED, PIPELINED = 4, 5, 15, 15
SESSIONS = SYNC_THREADS * SYNC_PER_THREAD + AWAITED + PIPELINED
UNDER_WAY = 4  # chunks every session has answered before A goes
AFTER = 8  # chunks each session sends once A is gone
MAX_CHUNKS = 80  # a session that has sent this many waits for A to go (bounds a slow start)
WAIT_S = 120.0


@dataclass
class Run:
    """One session's inputs and what it got back."""

    rng: np.random.Generator
    sent: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    target: str = ""
    error: BaseException | None = None

    def chunk(self) -> np.ndarray:
        x = self.rng.integers(0, 256, size=int(self.rng.integers(1, 9)), dtype=np.int64)
        self.sent.append(x)
        return x


class Stage:
    """Counts sessions under way; says when A is gone."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.under_way = 0
        self.all_under_way = threading.Event()
        self.gone = threading.Event()

    def started(self) -> None:
        with self.lock:
            self.under_way += 1
            if self.under_way == SESSIONS:
                self.all_under_way.set()

    def more(self, run: Run, after: int) -> bool:
        """Whether the session sends another chunk (``after``: chunks sent since A went)."""
        if len(run.sent) == UNDER_WAY:
            self.started()
        return after < AFTER


def _sync_thread(client: Client, runs: list[Run], stage: Stage) -> None:
    sessions = [client.session("tiny") for _ in runs]
    try:
        after = [0] * len(runs)
        while True:
            live = [k for k, run in enumerate(runs) if stage.more(run, after[k]) and run.error is None]
            if not live:
                break
            for k in live:
                if len(runs[k].sent) >= MAX_CHUNKS:
                    stage.gone.wait(WAIT_S)
                gone = stage.gone.is_set()
                try:
                    runs[k].outputs.append(sessions[k].step(runs[k].chunk()))
                except Exception as e:  # reported by the test
                    runs[k].error = e
                after[k] += gone
        for run, s in zip(runs, sessions, strict=True):
            run.target = s.target
    finally:
        for s in sessions:
            s.close()


async def _awaited(client: AsyncClient, run: Run, stage: Stage, gone: asyncio.Event) -> None:
    async with client.session("tiny") as s:
        after = 0
        while stage.more(run, after):
            if len(run.sent) >= MAX_CHUNKS:
                await gone.wait()
            was_gone = gone.is_set()
            run.outputs.append(await s.step(run.chunk()))
            after += was_gone
        run.target = s.target


async def _pipelined(client: AsyncClient, run: Run, stage: Stage, gone: asyncio.Event) -> None:
    async with client.session("tiny") as s:

        async def feed() -> None:
            after = 0
            while stage.more(run, after):
                if len(run.sent) >= MAX_CHUNKS:
                    await gone.wait()
                was_gone = gone.is_set()
                await s.send(run.chunk())
                after += was_gone
            await s.end()

        feeder = asyncio.create_task(feed())
        async for out in s:
            run.outputs.append(out.y)
        await feeder
        run.target = s.target


def _asyncio_sessions(address: list[str], runs: list[Run], stage: Stage, loop_ready: dict) -> None:
    async def main() -> None:
        gone = asyncio.Event()
        loop_ready["loop"], loop_ready["gone"] = asyncio.get_running_loop(), gone
        loop_ready["started"].set()
        # a small pipeline window keeps the pipelined sessions near the awaited ones (and bounds the buffers)
        async with AsyncClient(address, max_in_flight=4) as client:

            async def guarded(coro: Any, run: Run) -> None:
                try:
                    await coro
                except Exception as e:  # reported by the test
                    run.error = e

            work = [_awaited(client, r, stage, gone) for r in runs[:AWAITED]]
            work += [_pipelined(client, r, stage, gone) for r in runs[AWAITED:]]
            await asyncio.wait_for(asyncio.gather(*(guarded(w, r) for w, r in zip(work, runs, strict=True))), WAIT_S)

    asyncio.run(main())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_50_sessions_on_a_killed_or_drained_server_all_finish_on_the_other_exactly(
    spawn_server, tiny_oracle, caplog, sig
):
    caplog.set_level(logging.INFO, logger="cellserve.client.core")
    a = spawn_server("--token-keys", KEYS, "--grace-s", "60")
    b = spawn_server("--token-keys", KEYS)
    targets = [a.address, b.address]
    runs = [Run(np.random.default_rng([int(sig), i])) for i in range(SESSIONS)]
    sync_runs, aio_runs = runs[: SYNC_THREADS * SYNC_PER_THREAD], runs[SYNC_THREADS * SYNC_PER_THREAD :]
    stage = Stage()
    loop_ready: dict[str, Any] = {"started": threading.Event()}
    with Client(targets) as client:
        threads = [
            threading.Thread(target=_sync_thread, args=(client, sync_runs[k::SYNC_THREADS], stage))
            for k in range(SYNC_THREADS)
        ]
        threads.append(threading.Thread(target=_asyncio_sessions, args=(targets, aio_runs, stage, loop_ready)))
        for t in threads:
            t.start()
        try:
            assert stage.all_under_way.wait(WAIT_S), f"only {stage.under_way} of {SESSIONS} sessions got under way"
            a.proc.send_signal(sig)  # mid-run: every session is stepping
        finally:  # never leave the sessions waiting, whatever happened
            stage.gone.set()
            assert loop_ready["started"].wait(WAIT_S)
            loop_ready["loop"].call_soon_threadsafe(loop_ready["gone"].set)
            for t in threads:
                t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "sessions still running"
    assert a.proc.wait(timeout=30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    errors = [f"session {i}: {type(r.error).__name__}: {r.error}" for i, r in enumerate(runs) if r.error]
    assert not errors, errors
    for i, run in enumerate(runs):
        assert run.target == b.address, (i, run.target)
        assert len(run.outputs) == len(run.sent) >= UNDER_WAY + AFTER, (i, len(run.outputs), len(run.sent))
        want = tiny_oracle.sequence(np.concatenate(run.sent))
        np.testing.assert_allclose(np.concatenate(run.outputs), want, atol=1e-5, rtol=0, err_msg=f"session {i}")
    replays = [r.replayed for r in caplog.records if r.getMessage() == "session resumed"]
    moves = [r for r in caplog.records if r.getMessage() == "session moved off a draining server"]
    if sig == signal.SIGKILL:  # every session came back from its checkpoint, most replaying steps since
        assert len(replays) == SESSIONS and sum(replays) > SESSIONS, replays
    else:  # every session moved on its server's `draining` notice
        assert len(moves) == SESSIONS
