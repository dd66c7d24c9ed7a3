"""``cellserve serve --workers N``: one port, N processes, one /metrics; restarts and drains; a hung (SIGSTOPped)
worker killed and restarted; a killed supervisor's port free at once. Taken ports, the SDK's sessions from one
process on every worker and the merged exemplars are in test_workers_ports.py, _spread.py and _exemplars.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cellserve.client import AsyncClient, ChannelConfig
from cellserve.server.ports import PortTaken, check_free
from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

KEYS = '{"active": "k1", "keys": {"k1": "' + "7c" * 32 + '"}}'
CONNECTIONS = 16  # each its own channel (one TCP connection): the kernel spreads them over the workers


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def active(metrics_port: int) -> float:
    """Sessions open on one worker (its own metrics endpoint, as the ready file lists it)."""
    return value(scrape(metrics_port), "cellserve_sessions_active", model="tiny")


def fresh_connections_all_serving(address: str) -> bool:
    """A health check on each of CONNECTIONS new connections answers SERVING within a few seconds."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
    return True


class Sessions:
    """CONNECTIONS open sessions, each on its own channel, stepped one token at a time."""

    def __init__(self, address: str, tokens: list[np.ndarray]) -> None:
        self.address, self.tokens = address, tokens
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list[Any] = []
        self.outputs: list[list[np.ndarray]] = [[] for _ in tokens]

    async def open(self) -> None:
        for _ in self.tokens:
            # its own subchannel pool: channels to one target otherwise share one TCP connection (one worker)
            ch = grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
            call = pb_grpc.CellServeStub(ch).Stream()
            await call.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            assert (await call.read()).WhichOneof("kind") == "opened"
            self.channels.append(ch)
            self.calls.append(call)

    async def step(self, t: int) -> None:
        async def one(i: int, call: Any) -> None:
            await call.write(pb.StreamRequest(step=pb.Step(seq=t, input=to_proto(self.tokens[i][t : t + 1]))))
            resp = await call.read()
            assert resp.WhichOneof("kind") == "output", resp
            self.outputs[i].append(to_numpy(resp.output.output))

        await asyncio.gather(*(one(i, c) for i, c in enumerate(self.calls)))

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def step_through(self, steps: int) -> None:
        """Open every session, step each ``steps`` tokens, close them."""
        await self.open()
        for t in range(steps):
            await self.step(t)
        await self.close()


def test_connections_land_on_every_worker_and_metrics_are_their_sums(spawn_server, tiny_oracle):
    server = spawn_server("--workers", "2", "--token-keys", KEYS)
    info = server.ready_info()
    assert len(info["workers"]) == 2 and len({w["pid"] for w in info["workers"]}) == 2
    rng = np.random.default_rng(4)
    tokens = [rng.integers(0, 256, size=6, dtype=np.int64) for _ in range(CONNECTIONS)]
    sessions = Sessions(server.address, tokens)

    async def main() -> tuple[list[float], dict]:
        await sessions.open()
        for t in range(6):
            await sessions.step(t)
        per_worker = [active(w["metrics_port"]) for w in info["workers"]]
        total = scrape(server.metrics_port)
        await sessions.close()
        return per_worker, total

    per_worker, total = asyncio.run(main())
    assert all(n > 0 for n in per_worker), f"every worker should hold some of the {CONNECTIONS} sessions: {per_worker}"
    assert sum(per_worker) == CONNECTIONS
    assert value(total, "cellserve_sessions_active", model="tiny") == CONNECTIONS
    assert value(total, "cellserve_steps_total", model="tiny") == 6 * CONNECTIONS
    assert value(total, "cellserve_sessions_opened_total", model="tiny") == CONNECTIONS
    assert value(total, "cellserve_step_latency_seconds_count", model="tiny") == 6 * CONNECTIONS
    assert value(total, "cellserve_state_pool_slots", model="tiny", state="used") == CONNECTIONS
    assert value(total, "cellserve_workers") == 2
    assert value(total, "cellserve_build_info", version=__import__("cellserve").__version__) == 1  # not summed
    for i, got in enumerate(sessions.outputs):
        np.testing.assert_allclose(np.concatenate(got), tiny_oracle.sequence(tokens[i]), atol=1e-5, rtol=0)


def test_a_killed_worker_is_restarted_and_counters_keep_counting(spawn_server, wait_until):
    server = spawn_server("--workers", "2", "--token-keys", KEYS)
    victim = server.ready_info()["workers"][0]
    asyncio.run(Sessions(server.address, [np.arange(4, dtype=np.int64)] * CONNECTIONS).step_through(4))
    before = value(scrape(server.metrics_port), "cellserve_steps_total", model="tiny")
    assert before == 4 * CONNECTIONS
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        entry = server.ready_info()["workers"][0]
        return entry["ready"] and entry["pid"] != victim["pid"] and entry["restarts"] == 1

    wait_until(lambda: not server.ready_info()["workers"][0]["ready"], timeout_s=30)  # listed as restarting
    assert fresh_connections_all_serving(server.address)  # the replacement takes none while it warms up
    wait_until(replaced, timeout_s=60)
    after = scrape(server.metrics_port)
    assert value(after, "cellserve_worker_restarts_total") == 1
    assert value(after, "cellserve_workers") == 2
    assert value(after, "cellserve_steps_total", model="tiny") == before  # the dead worker's steps still count
    # and the port serves on both workers again
    asyncio.run(Sessions(server.address, [np.arange(4, dtype=np.int64)] * CONNECTIONS).step_through(4))
    assert value(scrape(server.metrics_port), "cellserve_steps_total", model="tiny") == before + 4 * CONNECTIONS
    assert server.proc.poll() is None
    assert "worker died" in _stop(server)


def test_sigterm_drains_every_worker_with_tokens_that_resume_elsewhere(spawn_server, tiny_oracle):
    a = spawn_server("--workers", "2", "--token-keys", KEYS, "--grace-s", "20")
    b = spawn_server("--token-keys", KEYS)
    rng = np.random.default_rng(8)
    tokens = [rng.integers(0, 256, size=10, dtype=np.int64) for _ in range(CONNECTIONS)]
    sessions = Sessions(a.address, tokens)

    async def main() -> list[np.ndarray]:
        await sessions.open()
        for t in range(5):
            await sessions.step(t)
        per_worker = [active(w["metrics_port"]) for w in a.ready_info()["workers"]]
        assert all(n > 0 for n in per_worker), per_worker
        a.proc.send_signal(signal.SIGTERM)
        results = []
        async with grpc.aio.insecure_channel(b.address) as ch_b:
            for i, call in enumerate(sessions.calls):
                draining = await call.read()  # idle: the next message is its worker's drain notice
                assert draining.WhichOneof("kind") == "draining", draining
                await call.write(pb.StreamRequest(close=pb.Close()))
                assert (await call.read()).closed.steps == 5
                await call.done_writing()
                resumed = pb_grpc.CellServeStub(ch_b).Stream()
                token = draining.draining.resume_token
                await resumed.write(pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token)))
                assert (await resumed.read()).opened.steps == 5
                await resumed.write(pb.StreamRequest(step=pb.Step(seq=5, input=to_proto(tokens[i][5:]))))
                rest = to_numpy((await resumed.read()).output.output)
                await resumed.done_writing()
                results.append(np.concatenate([*sessions.outputs[i], rest]))
        await sessions.close()
        return results

    results = asyncio.run(main())
    assert a.proc.wait(60) == 0
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, tiny_oracle.sequence(tokens[i]), atol=1e-5, rtol=0)


def test_health_goes_not_serving_on_every_worker_at_sigterm(spawn_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = spawn_server("--workers", "2", "--token-keys", KEYS, "--grace-s", "20")
    sessions = Sessions(server.address, [np.arange(2, dtype=np.int64)] * CONNECTIONS)

    async def main() -> list[int]:
        await sessions.open()  # held open: each worker drains for its grace period, still answering health
        per_worker = [active(w["metrics_port"]) for w in server.ready_info()["workers"]]
        assert all(n > 0 for n in per_worker), per_worker
        server.proc.send_signal(signal.SIGTERM)
        for call in sessions.calls:  # every worker has begun its drain
            assert (await call.read()).WhichOneof("kind") == "draining"
        statuses = []
        for ch in sessions.channels:  # each channel is its own connection: together they reach both workers
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            statuses.append(reply.status)
        for call in sessions.calls:
            await call.write(pb.StreamRequest(close=pb.Close()))
        await sessions.close()
        return statuses

    statuses = asyncio.run(main())
    assert set(statuses) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert server.proc.wait(60) == 0


def _stop(server: Any) -> str:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    return server.proc.stderr.read() if server.proc.stderr else ""


HEARTBEAT_TIMEOUT_S = 2.0
OWN_CONNECTION = ChannelConfig(extra_options=(("grpc.use_local_subchannel_pool", 1),))  # one client, one worker


def test_a_stopped_worker_is_killed_and_restarted_and_its_sdk_sessions_resume_exactly(
    spawn_server, tiny_oracle, wait_until
):
    server = spawn_server(
        "--workers", "2", "--token-keys", KEYS, "--worker-heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S)
    )
    victim, other = server.ready_info()["workers"]
    rng = np.random.default_rng(30)
    chunks: list[list[np.ndarray]] = []
    outputs: list[list[np.ndarray]] = []
    timings: dict[str, float] = {}

    def replaced() -> bool:
        entry = server.ready_info()["workers"][0]
        return entry["pid"] != victim["pid"] if entry["ready"] else True

    async def main() -> None:
        clients: list[AsyncClient] = []
        sessions: list = []
        try:
            # each client its own connection; open until the victim holds 3 sessions (the kernel picks)
            while active(victim["metrics_port"]) < 3 or active(other["metrics_port"]) < 1:
                assert len(sessions) < 40, "the kernel put 40 connections on one worker"
                clients.append(AsyncClient(server.address, OWN_CONNECTION, resume_timeout_s=30))
                sessions.append(await clients[-1].session("tiny"))
                chunks.append([rng.integers(0, 256, size=3, dtype=np.int64) for _ in range(8)])
                outputs.append([await sessions[-1].step(chunks[-1][0])])

            async def rest(i: int) -> None:
                for x in chunks[i][1:]:
                    outputs[i].append(await sessions[i].step(x))

            os.kill(victim["pid"], signal.SIGSTOP)
            stopped = time.monotonic()
            scrape(server.metrics_port)  # the supervisor's /metrics, while a worker hangs
            timings["scrape_s"] = time.monotonic() - stopped
            stepping = asyncio.ensure_future(asyncio.wait_for(asyncio.gather(*map(rest, range(len(sessions)))), 60))
            await wait_until.aio(replaced, timeout_s=HEARTBEAT_TIMEOUT_S + 10, what="the stopped worker killed")
            timings["detect_s"] = time.monotonic() - stopped
            await stepping
        finally:
            for s in sessions:
                await s.close()
            for c in clients:
                await c.close()

    try:
        asyncio.run(main())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGCONT)
            os.kill(victim["pid"], signal.SIGKILL)
    print(f"hung worker: killed {timings['detect_s']:.2f} s after SIGSTOP; /metrics took {timings['scrape_s']:.2f} s")
    assert timings["detect_s"] < HEARTBEAT_TIMEOUT_S + 3, timings
    assert timings["scrape_s"] < 1.5, timings  # not one per-worker timeout after another
    for i, got in enumerate(outputs):
        np.testing.assert_allclose(np.concatenate(got), tiny_oracle.sequence(np.concatenate(chunks[i])), atol=1e-5,
                                   rtol=0, err_msg=f"session {i}")  # fmt: skip
    wait_until(lambda: server.ready_info()["workers"][0]["ready"], timeout_s=60, what="the victim's replacement")
    assert fresh_connections_all_serving(server.address)  # every new connection reaches a worker that answers
    after = scrape(server.metrics_port)
    assert value(after, "cellserve_worker_hangs_total") == 1
    assert value(after, "cellserve_worker_restarts_total") == 1
    assert value(after, "cellserve_workers") == 2
    log = _stop(server)
    (line,) = [line for line in log.splitlines() if "worker stopped answering" in line]
    assert "worker=0" in line and f"pid={victim['pid']}" in line and "silent_s=" in line, line


def test_a_killed_supervisors_port_is_free_at_once_while_its_workers_drain(spawn_server, tiny_oracle, wait_until):
    a = spawn_server("--workers", "2", "--token-keys", KEYS, "--grace-s", "60")
    orphans = [w["pid"] for w in a.ready_info()["workers"]]
    rng = np.random.default_rng(6)
    tokens = [rng.integers(0, 256, size=6, dtype=np.int64) for _ in range(CONNECTIONS)]
    sessions = Sessions(a.address, tokens)

    def port_free() -> bool:
        try:
            check_free("127.0.0.1", a.port, "port")
        except PortTaken:
            return False
        return True

    async def main() -> list[np.ndarray]:
        await sessions.open()
        for t in range(3):
            await sessions.step(t)
        per_worker = [active(w["metrics_port"]) for w in a.ready_info()["workers"]]
        assert all(n > 0 for n in per_worker), per_worker
        a.proc.kill()
        a.proc.wait(10)
        killed = time.monotonic()
        drained = []
        for call in sessions.calls:  # each orphan drains the sessions it holds: a token for each
            draining = await asyncio.wait_for(call.read(), 30)
            assert draining.WhichOneof("kind") == "draining", draining
            drained.append(draining.draining.resume_token)
        await wait_until.aio(port_free, timeout_s=10, what="the orphaned workers to stop listening")
        print(f"killed supervisor: port free {time.monotonic() - killed:.2f} s after")
        assert all(_alive(pid) for pid in orphans), "the workers are still in their 60 s grace period"
        b = spawn_server("--port", str(a.port), "--token-keys", KEYS)  # the replacement binds the same port now
        assert b.port == a.port
        results = []
        async with grpc.aio.insecure_channel(b.address) as ch_b:
            for i, token in enumerate(drained):
                resumed = pb_grpc.CellServeStub(ch_b).Stream()
                await resumed.write(pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token)))
                assert (await resumed.read()).opened.steps == 3
                await resumed.write(pb.StreamRequest(step=pb.Step(seq=3, input=to_proto(tokens[i][3:]))))
                rest = to_numpy((await resumed.read()).output.output)
                await resumed.done_writing()
                results.append(np.concatenate([*sessions.outputs[i], rest]))
        await sessions.close()
        return results

    try:
        results = asyncio.run(main())
    finally:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, tiny_oracle.sequence(tokens[i]), atol=1e-5, rtol=0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
