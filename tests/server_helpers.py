"""Real servers for tests, on port 0: in-process on their own event loop, or as a ``cellserve serve`` child.

Outside conftest.py so that any test module can import them (a test folder's own conftest.py shadows the
module name ``conftest``); the fixtures in conftest.py are built on them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waiting import ready_info


@dataclass
class ServerHandle:
    server: Any  # cellserve.server.app.CellServer
    loop: asyncio.AbstractEventLoop
    registry: Any

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. ``server.sessions.expire_idle``)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def serve_in_thread(settings: Any, hooks: tuple = ()) -> Iterator[ServerHandle]:
    """Run ``build_server(settings)`` on its own event loop in a thread; stop it on exit."""
    from prometheus_client import CollectorRegistry

    from cellserve.server.app import build_server

    registry = CollectorRegistry()
    loop = asyncio.new_event_loop()
    holder: dict[str, Any] = {}
    started = threading.Event()

    async def start() -> None:
        server = build_server(settings, registry)
        for hook in hooks:
            server.add_servicer(hook)
        holder["server"] = server
        await server.start()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as e:
            holder["error"] = e
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="cellserve-test-server", daemon=True)
    thread.start()
    if not started.wait(60):
        raise TimeoutError("test server did not start within 60 s")
    if "error" in holder:
        raise holder["error"]
    handle = ServerHandle(holder["server"], loop, registry)
    try:
        yield handle
    finally:
        asyncio.run_coroutine_threadsafe(handle.server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    ready_file: Path | None = None  # rewritten by a --workers supervisor when a worker restarts

    def ready_info(self) -> dict:
        assert self.ready_file is not None
        return json.loads(self.ready_file.read_text())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server_process(model_dir: Path, workdir: Path, *args: str, env: dict | None = None) -> ServerProcess:
    """``cellserve serve`` as a child process on free ports; returns once its ready file says SERVING."""
    ready = workdir / f"ready-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cellserve.server.cli",
            "serve",
            "--model-dirs",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "auto",
            "--metrics-host",
            "127.0.0.1",
            "--ready-file",
            str(ready),
            *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )

    def exited_with() -> str:  # its stderr can be read to the end only once it has exited
        return proc.stderr.read() if proc.stderr and proc.poll() is not None else "(still running)"

    try:  # the ready file is written atomically once every model is SERVING
        info = ready_info(ready, proc, 60, exited_with)
    except AssertionError:
        proc.kill()
        raise
    return ServerProcess(proc, info["port"], info["metrics_port"], ready)
