"""Chaos: ``cellserve serve --workers 2`` with token keys, 100 SDK sessions stepping for a minute, and a fault
injector that every 10 s sends SIGKILL or SIGSTOP to a random serving worker (a stopped worker stays
stopped: the supervisor must find it). Every session must finish with outputs equal to the numpy oracle
over everything it sent, and no exception may reach a caller.

80 sessions are asyncio (8 clients, each its own connection, so the kernel spreads them over the workers)
and 20 are sync (4 threads, each with its own client). Sessions step at a paced rate (a 2-core box runs
the server, the clients and the oracle); the fault plan is seeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from replica_helpers import token_keys

from cellserve.client import AsyncClient, ChannelConfig, Client

KEYS = token_keys("c4")
SEED = 30
AIO_CLIENTS, AIO_PER_CLIENT, SYNC_THREADS, SYNC_PER_THREAD = 8, 10, 4, 5
SESSIONS = AIO_CLIENTS * AIO_PER_CLIENT + SYNC_THREADS * SYNC_PER_THREAD
DURATION_S = 60.0  # sessions step this long
FAULT_EVERY_S = 10.0  # faults at 10, 20, 30, 40, 50 s: the last has 10 s to heal before the sessions end
FAULTS = [signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP, signal.SIGSTOP, signal.SIGSTOP]  # order: seeded shuffle
PACE_S = 0.2  # between one session's steps: load shaping (about 500 steps/s in all), not a wait for anything
HEARTBEAT_TIMEOUT_S = 3.0
OWN_CONNECTION = ChannelConfig(extra_options=(("grpc.use_local_subchannel_pool", 1),))
BOUND_S = DURATION_S + 45.0  # every session has ended by then, or the test fails


@dataclass
class Run:
    """One session's inputs and what it got back."""

    rng: np.random.Generator
    sent: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None

    def chunk(self) -> np.ndarray:
        x = self.rng.integers(0, 256, size=int(self.rng.integers(1, 5)), dtype=np.int64)
        self.sent.append(x)
        return x


@dataclass
class Fault:
    at_s: float
    sig: signal.Signals
    index: int
    pid: int


class Injector(threading.Thread):
    """Every FAULT_EVERY_S, one signal of the seeded plan to a random worker the ready file lists as serving."""

    def __init__(self, ready_info: Any, started: float, done: threading.Event) -> None:
        super().__init__(name="chaos-injector", daemon=True)
        self.ready_info, self.started, self.done = ready_info, started, done
        self.rng = np.random.default_rng(SEED)
        self.plan = [FAULTS[i] for i in self.rng.permutation(len(FAULTS))]
        self.faults: list[Fault] = []
        self.stopped: list[int] = []  # pids sent SIGSTOP: the test's clean-up continues and kills them

    def run(self) -> None:
        for k, sig in enumerate(self.plan):
            at = self.started + FAULT_EVERY_S * (k + 1)
            if self.done.wait(max(0.0, at - time.monotonic())):  # the run ended early (a failure): stop too
                return
            index = int(self.rng.integers(2))
            serving = [w for w in self.ready_info()["workers"] if w["ready"]]
            target = next((w for w in serving if w["index"] == index), serving[0] if serving else None)
            if target is None:
                continue  # both restarting: nothing to hit (the assertions count the faults sent)
            if sig == signal.SIGSTOP:
                self.stopped.append(target["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(target["pid"], sig)
            self.faults.append(Fault(time.monotonic() - self.started, sig, target["index"], target["pid"]))


def _sync_thread(address: str, runs: list[Run], until: float) -> None:
    with Client(address, OWN_CONNECTION) as client:
        sessions = [client.session("tiny") for _ in runs]
        try:
            while time.monotonic() < until:
                for s, run in zip(sessions, runs, strict=True):
                    if run.error is None:
                        try:
                            run.outputs.append(s.step(run.chunk()))
                        except Exception as e:  # reported by the test
                            run.error = e
                threading.Event().wait(PACE_S)  # pacing, as for the asyncio sessions
        finally:
            for s in sessions:
                with contextlib.suppress(Exception):
                    s.close()


async def _aio_sessions(address: str, runs: list[Run], until: float) -> None:
    async def one(client: AsyncClient, run: Run) -> None:
        try:
            async with client.session("tiny") as s:
                while time.monotonic() < until:
                    run.outputs.append(await s.step(run.chunk()))
                    await asyncio.sleep(PACE_S)  # pacing: load shaping, not a wait for anything
        except Exception as e:  # reported by the test
            run.error = e

    clients = [AsyncClient(address, OWN_CONNECTION) for _ in range(AIO_CLIENTS)]
    try:
        work = [one(clients[i % AIO_CLIENTS], run) for i, run in enumerate(runs)]
        await asyncio.wait_for(asyncio.gather(*work), BOUND_S)
    finally:
        for c in clients:
            await c.close()


def _counter(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_100_sessions_survive_a_minute_of_killed_and_stopped_workers(spawn_server, tiny_oracle) -> None:
    server = spawn_server(
        "--workers", "2", "--token-keys", KEYS, "--grace-s", "5",
        "--worker-heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S),
    )  # fmt: skip
    runs = [Run(np.random.default_rng([SEED, i])) for i in range(SESSIONS)]
    aio_runs, sync_runs = runs[: AIO_CLIENTS * AIO_PER_CLIENT], runs[AIO_CLIENTS * AIO_PER_CLIENT :]
    started = time.monotonic()
    until = started + DURATION_S
    done = threading.Event()
    injector = Injector(server.ready_info, started, done)
    threads = [  # daemons: a failed run must not hold the test process open
        threading.Thread(target=_sync_thread, args=(server.address, sync_runs[k::SYNC_THREADS], until), daemon=True)
        for k in range(SYNC_THREADS)
    ]
    aio_main = lambda: asyncio.run(_aio_sessions(server.address, aio_runs, until))  # noqa: E731
    threads.append(threading.Thread(target=aio_main, daemon=True))
    try:
        injector.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, started + BOUND_S - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "sessions still running"
        injector.join(10)
        hangs = _counter(server.metrics_port, "cellserve_worker_hangs_total")
        restarts = _counter(server.metrics_port, "cellserve_worker_restarts_total")
    finally:
        done.set()
        injector.join(10)
        for pid in injector.stopped:  # a stopped worker the supervisor did not kill must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except Exception:
            server.proc.kill()
    elapsed = time.monotonic() - started
    errors = [f"session {i}: {type(r.error).__name__}: {r.error}" for i, r in enumerate(runs) if r.error]
    assert not errors, errors
    assert len(injector.faults) == len(FAULTS), injector.faults
    stops = sum(f.sig == signal.SIGSTOP for f in injector.faults)
    assert hangs >= stops and restarts >= len(FAULTS), (hangs, restarts, injector.faults)
    steps = [len(r.sent) for r in runs]
    print(f"chaos: {len(injector.faults)} faults {[(round(f.at_s), f.sig.name, f.index) for f in injector.faults]}; "
          f"hangs={hangs:g} restarts={restarts:g}; {sum(steps)} step messages, min {min(steps)} per session; "
          f"{elapsed:.0f} s")  # fmt: skip
    for i, run in enumerate(runs):
        assert len(run.outputs) == len(run.sent) > 0, (i, len(run.outputs), len(run.sent))
        want = tiny_oracle.sequence(np.concatenate(run.sent))
        np.testing.assert_allclose(np.concatenate(run.outputs), want, atol=1e-5, rtol=0, err_msg=f"session {i}")
