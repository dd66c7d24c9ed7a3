"""Shared fixtures: a tiny exported model, its numpy oracle, and real servers on port 0."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cellserve.model.manifest import Manifest


@dataclass
class TinyModel:
    dir: Path
    manifest: Manifest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A random-weight byte-level model (2 layers, H=32), exported with its checkpoint."""
    from cellserve.model.export import export_random_model

    out = tmp_path_factory.mktemp("tiny-model")
    manifest = export_random_model(out, name="tiny", layers=2, hidden=32, seed=0)
    return TinyModel(out, manifest)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model: TinyModel) -> Path:
    return tiny_model.dir


@pytest.fixture(scope="session")
def tiny_oracle(tiny_model: TinyModel) -> Any:
    """The numpy reference cell loaded with the tiny model's weights (float64): the test oracle."""
    from cellserve.model.reference import ReferenceLSTM

    return ReferenceLSTM.from_checkpoint(tiny_model.dir / "checkpoint.pt")


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


@pytest.fixture
def running_server(tiny_model_dir: Path) -> Callable[..., AbstractContextManager[ServerHandle]]:
    """Factory: ``with running_server(capacity=8) as srv:`` serves the tiny model on 127.0.0.1:0."""
    from cellserve.server.settings import Settings

    def factory(model_dirs: list[Path] | None = None, hooks: tuple = (), **overrides: Any) -> Any:
        base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": "auto", "metrics_host": "127.0.0.1"}
        base.update(overrides)
        settings = Settings(model_dirs=model_dirs or [tiny_model_dir], **base)
        return serve_in_thread(settings, hooks)

    return factory


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server_process(model_dir: Path, workdir: Path, *args: str, env: dict | None = None) -> ServerProcess:
    """``cellserve serve`` as a child process on free ports; returns once its ready file says SERVING."""
    ready = workdir / f"ready-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellserve.server.cli", "serve", "--model-dirs", str(model_dir), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "auto", "--metrics-host", "127.0.0.1", "--ready-file", str(ready), *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():  # written atomically once every model is SERVING
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not become ready: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return ServerProcess(proc, info["port"], info["metrics_port"])


@pytest.fixture
def spawn_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for ``cellserve serve`` child processes (tiny model); all are killed at teardown."""
    started: list[ServerProcess] = []

    def factory(*args: str, model_dir: Path | None = None) -> ServerProcess:
        server = start_server_process(model_dir or tiny_model_dir, tmp_path, *args)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(10)
        if server.proc.stderr:
            server.proc.stderr.close()
