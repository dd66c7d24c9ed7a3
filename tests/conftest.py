"""Shared fixtures: a tiny exported model, its numpy oracle, and real servers on port 0."""

from __future__ import annotations

import asyncio
import threading
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
