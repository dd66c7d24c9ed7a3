"""``cellserve serve --workers N``: N serving processes on one gRPC port, run by a small supervisor.

Sessions belong to streams and streams to connections, so each worker owns its sessions outright:
its own state pool, onnxruntime session and scheduler, no locks across processes. The kernel spreads
new connections over the workers (SO_REUSEPORT, on purpose here: the supervisor holds a
:class:`~cellserve.server.ports.PortGuard`, so no other server can join the port). The supervisor
itself loads no model. It:

- hands every worker the same resume-token keys (generated if none are configured), so a session
  continues on any worker — after a drain, or when its worker died;
- serves the one public ``/metrics``, summing the workers' own (``metrics_merge``);
- writes the ready file once every worker is SERVING (and again after a restart);
- restarts a worker that dies (logged; a crash loop backs off), while its clients resume elsewhere;
- kills and restarts a worker that stops answering (below);
- on SIGTERM/SIGINT tells every worker to drain (each pushes resume tokens to its own sessions and
  goes NOT_SERVING at once), waits for them, and exits 0.

Liveness: a worker's event loop sends a heartbeat over its pipe every ``worker_heartbeat_timeout_s / 5``
(a thread sends them while it loads and warms its models, whose calls may block the loop). A worker silent
for ``worker_heartbeat_timeout_s`` (a native call that never returns, SIGSTOP, a livelocked loop) is
SIGKILLed, logged (``worker stopped answering``: index, pid, seconds silent), counted in
``cellserve_worker_hangs_total`` and restarted like a dead one. Its death closes its listening socket and
connections, so the kernel routes new connections to the others and its clients resume there. The window
that remains: for up to the timeout, new connections the kernel hands the hung worker (about 1 in N) and
health checks through the port get no answer (a deadline, never SERVING); the SDK's connect deadline
(``ChannelConfig.connect_timeout_s``) moves its opens on. A starting worker is allowed
``STARTING_SILENCE_S`` (model loads may hold the interpreter).

If the supervisor itself dies (SIGKILL, OOM), each worker gets SIGTERM (``PR_SET_PDEATHSIG``), stops
listening at once, so that a replacement server can bind the port, and drains the sessions it holds
(resume tokens pushed, ``grace_s``) as on a normal drain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import SecretStr

from cellserve.server.heartbeat import BEAT
from cellserve.server.metrics_http import serve_metrics
from cellserve.server.metrics_merge import MergedMetrics
from cellserve.server.ports import PortGuard, check_free
from cellserve.server.resume_token import TokenKeys
from cellserve.server.settings import Settings
from cellserve.server.worker_process import worker_main

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # loading and warming a model
SHORT_LIFE_S = 10.0  # a worker that dies sooner than this after its start is crash-looping: back off
MAX_BACKOFF_S = 30.0
STOP_MARGIN_S = 30.0  # after grace_s + this, a worker that has not drained is killed
STARTING_SILENCE_S = 30.0  # a worker not yet serving may be silent this long (interpreter start, model load)


@dataclass
class _Worker:
    index: int
    process: Any = None  # multiprocessing.Process
    conn: Connection | None = None
    pid: int = 0
    metrics_port: int = 0
    started_at: float = 0.0
    ready_at: float = 0.0
    ready: bool = False
    backoff_s: float = 0.0
    heard_at: float = 0.0  # the last message (heartbeat or ready) from it, or its spawn
    restart_at: float = 0.0  # when a dead worker is due to be started again
    restarts: int = 0


class Supervisor:
    """Runs and watches the worker processes of one ``cellserve serve --workers N``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = PortGuard(settings.host, settings.port)  # PortTaken if anyone else holds it
        if settings.metrics_port not in (0, "auto"):
            check_free(settings.metrics_host, int(settings.metrics_port), "metrics_port")
        self.worker_settings = settings.model_copy(
            update={
                "port": self.guard.port,
                "metrics_port": "auto",  # each worker's own, on loopback: read by the supervisor only
                "metrics_host": "127.0.0.1",
                "ready_file": None,
                "workers": 1,
                "token_keys": SecretStr(
                    TokenKeys.from_settings(settings, unset="one random key is shared by this server's workers only")
                    .to_json()
                ),
                "token_keys_file": None,
            }
        )
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.registry = CollectorRegistry()
        self.registry.register(MergedMetrics(self._live_metrics))
        self._m_workers = Gauge("cellserve_workers", "Worker processes serving now.", registry=self.registry)
        self._m_restarts = Counter(
            "cellserve_worker_restarts", "Worker processes restarted after they died.", registry=self.registry
        )
        self._m_hangs = Counter(
            "cellserve_worker_hangs",
            "Worker processes killed because they stopped answering heartbeats (then restarted).",
            registry=self.registry,
        )
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC or onnxruntime state
        self._http: Any = None
        self.metrics_port = 0
        self._stopping = False
        self._signal_r, self._signal_w = os.pipe()

    # -- the supervisor's loop --------------------------------------------------------------------

    def run(self) -> int:
        """Start every worker, watch them until a signal, drain them, return the exit status."""
        os.set_blocking(self._signal_w, False)
        signal.set_wakeup_fd(self._signal_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            if self.settings.metrics_port:
                self._http = serve_metrics(self.settings.metrics_host, self.settings.metrics_port, self.registry)
                self.metrics_port = self._http.server_port
            for worker in self.workers:
                self._spawn(worker)
            failed = self._wait_all_ready()
            if failed is not None:  # a signal, or a worker that could not start: drain the ones that did
                self._drain()
                return 0 if failed == "signal" else 1
            self._write_ready_file()
            log.info(
                "serving with workers",
                extra={
                    "port": self.guard.port,
                    "metrics_port": self.metrics_port,
                    "workers": len(self.workers),
                    "pids": [w.pid for w in self.workers],
                },
            )
            self._watch()
            return self._drain()
        finally:
            signal.set_wakeup_fd(-1)
            for worker in self.workers:
                if worker.process is not None and worker.process.is_alive():
                    worker.process.kill()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self.guard.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("signal received; draining every worker", extra={"signal": signal.Signals(signum).name})
        self._stopping = True

    def _spawn(self, worker: _Worker) -> None:
        parent, child = self._ctx.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        worker.process = self._ctx.Process(
            target=worker_main,
            args=(self.worker_settings, worker.index, len(self.workers), child, level, os.getpid()),
            name=f"cellserve-worker-{worker.index}",
        )
        worker.process.start()
        child.close()
        worker.conn, worker.pid, worker.ready = parent, worker.process.pid, False
        worker.started_at = worker.heard_at = time.monotonic()

    def _wait_all_ready(self) -> str | None:
        """None once every worker is SERVING; else why not ("signal", or "failed" with the reason printed)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(w.ready for w in self.workers):
            if self._stopping:
                return "signal"
            pending = [w for w in self.workers if not w.ready]
            waitables: list[Any] = [self._signal_r]
            for w in pending:
                waitables += [w.process.sentinel] + ([w.conn] if w.conn is not None else [])
            due = min([deadline] + [w.heard_at + self._silence_allowed(w) for w in self.workers])
            wait(waitables, timeout=max(0.0, due - time.monotonic()))
            self._clear_signal_pipe()
            for w in self.workers:
                self._read(w)
            for w in self.workers:
                if self._silent(w):
                    print(
                        f"cellserve serve: error: worker {w.index} stopped answering for "
                        f"{self._silence_allowed(w):g} s while starting; stopping the others",
                        file=sys.stderr,
                    )
                    return "failed"
            for w in pending:
                if w.ready:
                    continue
                if not w.process.is_alive():
                    print(
                        f"cellserve serve: error: worker {w.index} exited with status {w.process.exitcode} before "
                        "it was ready (its error is above); stopping the others",
                        file=sys.stderr,
                    )
                    return "failed"
            if time.monotonic() > deadline:
                print(
                    f"cellserve serve: error: workers not ready within {READY_TIMEOUT_S:.0f} s; stopping them",
                    file=sys.stderr,
                )
                return "failed"
        return None

    def _read(self, worker: _Worker) -> bool:
        """Take every message the worker sent (heartbeats, its ready message); True if it just became ready."""
        became_ready = False
        try:
            while worker.conn is not None and worker.conn.poll():
                message = worker.conn.recv()
                worker.heard_at = time.monotonic()
                if message == BEAT:
                    continue
                worker.pid, worker.metrics_port, worker.ready = int(message["pid"]), int(message["metrics_port"]), True
                worker.ready_at = worker.heard_at
                self._m_workers.set(sum(w.ready for w in self.workers))
                became_ready = True
        except (EOFError, OSError):  # it exited (its sentinel says so): nothing more will come
            if worker.conn is not None:
                worker.conn.close()
            worker.conn = None
        return became_ready

    def _silence_allowed(self, worker: _Worker) -> float:
        timeout = self.settings.worker_heartbeat_timeout_s
        return timeout if worker.ready else max(timeout, STARTING_SILENCE_S)

    def _silent(self, worker: _Worker) -> bool:
        """Whether a live worker has said nothing for too long; if so it is killed here (hung, or stopped)."""
        if worker.process is None or not worker.process.is_alive():
            return False
        silent_s = time.monotonic() - worker.heard_at
        if silent_s <= self._silence_allowed(worker):
            return False
        log.warning(
            "worker stopped answering; killing it (its sessions resume on the others)",
            extra={
                "worker": worker.index,
                "pid": worker.pid,
                "silent_s": round(silent_s, 1),
                "timeout_s": self._silence_allowed(worker),
                "serving": worker.ready,
            },
        )
        worker.process.kill()  # SIGKILL ends a stopped process too
        worker.process.join(5)
        worker.heard_at = time.monotonic()  # one that does not die at once (uninterruptible I/O) is not counted twice
        self._m_hangs.inc()
        return True

    def _watch(self) -> None:
        """Until a signal: restart workers that die, and note the ones that come back ready."""
        while not self._stopping:
            now = time.monotonic()
            waitables: list[Any] = [self._signal_r]
            due = []  # when something must happen without an event: a restart, a start-up deadline
            for w in self.workers:
                if w.process is None:
                    due.append(w.restart_at)
                    continue
                waitables.append(w.process.sentinel)
                if w.conn is not None:
                    waitables.append(w.conn)
                due.append(w.heard_at + self._silence_allowed(w))
                if not w.ready:
                    due.append(w.started_at + READY_TIMEOUT_S)
            wait(waitables, timeout=max(0.0, min(due) - now) if due else None)
            self._clear_signal_pipe()
            if self._stopping:
                return
            for w in self.workers:  # every message first: a supervisor that woke late must not see silence
                if w.process is not None and self._read(w):
                    log.info("worker back", extra={"worker": w.index, "pid": w.pid})
                    self._write_ready_file()
            for w in self.workers:
                if w.process is None:
                    if time.monotonic() >= w.restart_at:
                        self._spawn(w)
                    continue
                self._silent(w)  # kills it: its death is handled below
                if not w.ready and time.monotonic() > w.started_at + READY_TIMEOUT_S:
                    log.warning("worker not ready in time; killing it", extra={"worker": w.index, "pid": w.pid})
                    w.process.kill()
                    w.process.join(5)
                if not w.process.is_alive():
                    self._on_death(w)

    def _on_death(self, worker: _Worker) -> None:
        code = worker.process.exitcode
        # how long it served (or, if it never did, lived): a worker that dies soon after is crash-looping
        lived = time.monotonic() - (worker.ready_at if worker.ready else worker.started_at)
        worker.backoff_s = min(MAX_BACKOFF_S, max(1.0, 2 * worker.backoff_s)) if lived < SHORT_LIFE_S else 0.0
        cause = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"status {code}"
        log.warning(
            "worker died; restarting it (its sessions resume on the others with their tokens)",
            extra={
                "worker": worker.index,
                "pid": worker.pid,
                "exit": cause,
                "lived_s": round(lived, 1),
                "restart_in_s": worker.backoff_s,
            },
        )
        if worker.conn is not None:
            worker.conn.close()
        worker.process, worker.conn, worker.ready = None, None, False
        worker.restart_at = time.monotonic() + worker.backoff_s
        worker.restarts += 1
        self._m_restarts.inc()
        self._m_workers.set(sum(w.ready for w in self.workers))
        self._write_ready_file()  # it no longer lists the dead worker as serving

    def _drain(self) -> int:
        """SIGTERM every worker (each drains its own sessions), wait for all, then exit 0."""
        running = [w for w in self.workers if w.process is not None and w.process.is_alive()]
        for w in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_s + STOP_MARGIN_S
        for w in running:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning("worker did not drain in time; killing it", extra={"worker": w.index, "pid": w.pid})
                w.process.kill()
                w.process.join(5)
        self._m_workers.set(0)
        log.info("all workers drained", extra={"workers": len(running)})
        return 0

    # -- helpers ----------------------------------------------------------------------------------

    def _clear_signal_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.set_blocking(self._signal_r, False)
            while os.read(self._signal_r, 512):
                pass

    def _live_metrics(self) -> list[tuple[int, str]]:
        return [(w.pid, f"http://127.0.0.1:{w.metrics_port}/metrics") for w in self.workers if w.ready]

    def _write_ready_file(self) -> None:
        path = self.settings.ready_file
        if path is None:
            return
        info = {
            "port": self.guard.port,
            "metrics_port": self.metrics_port,
            "pid": os.getpid(),
            "workers": [_worker_info(w) for w in self.workers],
        }
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)


def _worker_info(w: _Worker) -> dict[str, Any]:
    """A worker in the ready file: its pid and metrics port while it serves; only its index while it restarts."""
    if not w.ready:
        return {"index": w.index, "ready": False, "restarts": w.restarts}
    return {"index": w.index, "ready": True, "pid": w.pid, "metrics_port": w.metrics_port, "restarts": w.restarts}
