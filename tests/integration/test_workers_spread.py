"""SDK sessions from one process reach every worker of ``serve --workers 2``, from one Client or from many,
sync and asyncio: the SDK's pool of connections spreads them (the kernel balances connections, not streams)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
import pytest
from test_workers import active

from cellserve.client import AsyncClient, Client

SPREAD_SESSIONS = 16  # one Client's: the default pool gives each its own connection


def _one_process_sessions(server: Any, api: str, clients: int, sessions: int) -> list[float]:
    """Open ``sessions`` over ``clients`` SDK clients with the default ChannelConfig, step each once, and
    return how many each worker holds (its own metrics port) while they are all open."""
    address, workers = server.address, server.ready_info()["workers"]

    def per_worker() -> list[float]:
        return [active(w["metrics_port"]) for w in workers]

    x = np.array([1, 2], dtype=np.int64)
    if api == "sync":
        with contextlib.ExitStack() as stack:
            made = [stack.enter_context(Client(address)) for _ in range(clients)]
            held = [stack.enter_context(made[i % clients].session("tiny")) for i in range(sessions)]
            for s in held:
                s.step(x)
            return per_worker()

    async def main() -> list[float]:
        async with contextlib.AsyncExitStack() as stack:
            made = [await stack.enter_async_context(AsyncClient(address)) for _ in range(clients)]
            held = [await stack.enter_async_context(made[i % clients].session("tiny")) for i in range(sessions)]
            await asyncio.gather(*(s.step(x) for s in held))
            return per_worker()

    return asyncio.run(main())


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize(("clients", "sessions"), [(1, SPREAD_SESSIONS), (20, 20)], ids=["one-client", "20-clients"])
def test_sdk_sessions_from_one_process_reach_every_worker(spawn_server, api, clients, sessions):
    """As a new user would: default settings, ``serve --workers 2``, all sessions from one process. gRPC
    gives every channel to one address in a process the same connection, and the kernel balances
    connections, not streams: without the SDK's pool of connections every session lands on one worker."""
    server = spawn_server("--workers", "2")
    per_worker = _one_process_sessions(server, api, clients, sessions)
    assert sum(per_worker) == sessions, per_worker
    assert all(n > 0 for n in per_worker), f"every worker should hold some of the {sessions} sessions: {per_worker}"
