"""Running the baseline servers as subprocesses: ready file, SIGTERM, and the parent's side."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

import grpc


async def serve_until_signal(started: Awaitable[tuple[grpc.aio.Server, int]], ready_file: Path) -> None:
    """Await the server's start, write {"port", "pid"} to ``ready_file``, stop on SIGTERM/SIGINT."""
    server, port = await started
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    tmp.replace(ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


class ServerProcess:
    """A server started as a subprocess that writes a ready file; stopped with SIGTERM on exit."""

    def __init__(
        self, argv: Sequence[str], name: str, timeout_s: float = 120.0, env: dict[str, str] | None = None
    ) -> None:
        """``env``: variables set for the server on top of this process's environment."""
        self.argv = list(argv)
        self.env = env
        self.name = name
        self.timeout_s = timeout_s
        self.info: dict = {}
        self._dir = tempfile.TemporaryDirectory(prefix=f"cellserve-bench-{name}-")
        self.ready_file = Path(self._dir.name) / "ready.json"
        self.log_file = Path(self._dir.name) / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    def __enter__(self) -> ServerProcess:
        log = self.log_file.open("wb")
        argv = [a.replace("{ready_file}", str(self.ready_file)) for a in self.argv]
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"{self.name} server not ready within {self.timeout_s} s")
            time.sleep(0.05)  # polling a child's ready file: no event to wait on across processes
        self.info = json.loads(self.ready_file.read_text())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._dir.cleanup()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def cellserve_process(
    model_dir: Path | None,
    serve_args: Sequence[str],
    max_streams: int | None = 1024,
    *,
    name: str = "cellserve",
    log_level: str | None = None,
    pythonpath: Path | None = None,
) -> ServerProcess:
    """``cellserve serve`` on free ports (loopback) for a bench: enter it to start, exit to stop.

    ``max_streams`` None keeps the server's default; ``log_level`` goes before ``serve`` (e.g. "WARNING");
    ``pythonpath`` runs the cellserve package found there (e.g. an older checkout's) instead of this one.
    """
    argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "auto", "--metrics-host", "127.0.0.1",
            "--ready-file", "{ready_file}"]  # fmt: skip
    if max_streams is not None:
        argv += ["--max-streams", str(max_streams)]
    argv += serve_args
    if model_dir is not None:
        argv += ["--model-dirs", str(model_dir)]
    if log_level is not None:
        argv = ["--log-level", log_level, *argv]
    env = {"PYTHONPATH": str(pythonpath)} if pythonpath is not None else None
    return ServerProcess(python_module("cellserve.server.cli", *argv), name, env=env)
