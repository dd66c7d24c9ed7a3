"""SDK sessions from one process reach every worker of ``serve --workers 2``, from one Client or from many,
sync and asyncio: the SDK's pool of connections spreads them (the kernel balances connections, not streams),
and one Client's sessions and gateway streams sit evenly on the workers: each connection says which worker it
reached (ListModels), and the pool places by it (client/connection_pool.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
from typing import Any

import grpc
import numpy as np
import pytest
from test_workers import active

from cellserve.client import AsyncClient, ChannelConfig, Client, UnavailableError
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

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
    if clients == 1:  # one pool: placed by worker, not by the kernel's hash of each connection
        assert per_worker == [sessions / 2] * 2, per_worker


def _gateway_on_workers(server: Any, api: str, keys: list[str], streams: int | None) -> list[float]:
    """A gateway of ``keys`` over ``streams`` streams from one default Client; sessions per worker while open."""
    address, workers = server.address, server.ready_info()["workers"]
    x = np.ones((len(keys), 2), dtype=np.int64)
    if api == "sync":
        with Client(address) as client, client.gateway("tiny", keys=keys, streams=streams) as gateway:
            gateway.step_arrays(keys, x)
            return [active(w["metrics_port"]) for w in workers]

    async def main() -> list[float]:
        async with AsyncClient(address) as client, client.gateway("tiny", keys=keys, streams=streams) as gateway:
            await gateway.step_arrays(keys, x)
            return [active(w["metrics_port"]) for w in workers]

    return asyncio.run(main())


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("streams", [4, None], ids=["4-streams", "default"])
def test_a_gateways_streams_sit_evenly_on_the_workers(spawn_server, api, streams):
    """16 sessions against ``--workers 2``, over 4 streams (two on each worker, every time: by the kernel's hash
    alone 2:2 comes 3 times in 8) or by default one stream per worker (the server says how many)."""
    server = spawn_server("--workers", "2")
    keys = [f"k{i}" for i in range(16)]
    assert _gateway_on_workers(server, api, keys, streams) == [8, 8]


def test_each_connection_says_which_worker_it_reached(spawn_server):
    """ListModels on connections of their own (gRPC's own pool would give them one): each answer names the
    worker that holds the connection (a session opened on it shows on that worker's metrics), and both
    workers answer (all 12 on one: 1 in 2048)."""
    server = spawn_server("--workers", "2")
    workers = server.ready_info()["workers"]
    said, held = [], [0, 0]
    with contextlib.ExitStack() as stack:
        for _ in range(12):
            channel = stack.enter_context(
                grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            )
            stub = pb_grpc.CellServeStub(channel)
            answer = stub.ListModels(pb.ListModelsRequest(), timeout=10)
            said.append((answer.worker, answer.workers))
            requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
            requests.put(pb.StreamRequest(open=pb.Open(model="tiny")))  # and the stream stays open till the end
            call = stub.Stream(iter(requests.get, None), timeout=30)
            stack.callback(call.cancel)
            stack.callback(requests.put, None)
            assert next(call).WhichOneof("kind") == "opened"
            held[answer.worker] += 1
            assert [active(w["metrics_port"]) for w in workers] == held, (said, held)
    assert set(said) == {(0, 2), (1, 2)}, said


@pytest.mark.parametrize("api", ["sync", "async"])
def test_after_one_open_times_out_on_a_stopped_worker_new_sessions_go_to_the_other(spawn_server, api):
    """A hung worker (SIGSTOP; its supervisor would kill it only after 60 s here): the first new session that
    lands on it fails after connect_timeout_s, and the pool then avoids that worker, so the next ones open at
    once on the other (the pool before this took every other open there: 4 of 8 failed)."""
    server = spawn_server("--workers", "2", "--worker-heartbeat-timeout-s", "60")
    victim = server.ready_info()["workers"][0]
    config = ChannelConfig(connect_timeout_s=1.0)
    x = np.array([1, 2], dtype=np.int64)
    failed = []

    def sync_run() -> None:
        with Client(server.address, config) as client:
            held = [client.session("tiny") for _ in range(2)]  # one on each worker
            os.kill(victim["pid"], signal.SIGSTOP)
            for _ in range(6):
                try:
                    held.append(client.session("tiny"))
                    held[-1].step(x)
                except UnavailableError:
                    failed.append(1)

    async def async_run() -> None:
        async with AsyncClient(server.address, config) as client:
            held = [await client.session("tiny") for _ in range(2)]
            os.kill(victim["pid"], signal.SIGSTOP)
            for _ in range(6):
                try:
                    held.append(await client.session("tiny"))
                    await held[-1].step(x)
                except UnavailableError:
                    failed.append(1)

    try:
        sync_run() if api == "sync" else asyncio.run(async_run())
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    assert len(failed) <= 1, f"{len(failed)} of 6 opens failed on the stopped worker"
