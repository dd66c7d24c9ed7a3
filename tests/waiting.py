"""The one way the tests wait: bounded polling of a condition (sync, or on an event loop).

Outside conftest.py so that helper modules (replica_helpers.py) can use it too: each test folder
with a conftest.py of its own shadows the module name ``conftest``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

What = str | Callable[[], str]  # what was awaited, for the failure message (a callable: worked out on failure)


class WaitUntil:
    """Bounded polling of a condition that changes outside the test's control (a server's clean-up, a
    watcher thread, a clock, a file, another process): the one way the tests wait. ``check`` may raise to
    fail at once (e.g. when the process it waits on exited); its first truthy value is returned. Past
    ``timeout_s`` the test fails, saying ``what`` it waited for."""

    def __call__(
        self, check: Callable[[], Any], timeout_s: float = 20.0, *, poll_s: float = 0.05, what: What = ""
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := check()):
            assert time.monotonic() < deadline, f"condition not reached in time ({timeout_s:g} s){_about(what)}"
            time.sleep(poll_s)
        return value

    async def aio(
        self, check: Callable[[], Any], timeout_s: float = 20.0, *, poll_s: float = 0.01, what: What = ""
    ) -> Any:
        """The same on an event loop: polls with ``asyncio.sleep`` (``poll_s=0``: every turn of the loop)."""
        deadline = time.monotonic() + timeout_s
        while not (value := check()):
            assert time.monotonic() < deadline, f"condition not reached in time ({timeout_s:g} s){_about(what)}"
            await asyncio.sleep(poll_s)
        return value


def _about(what: What) -> str:
    text = what() if callable(what) else what
    return f": {text}" if text else ""


def ready_info(ready: Path, proc: subprocess.Popen, timeout_s: float, log: Callable[[], str]) -> dict:
    """The JSON ``cellserve serve --ready-file`` writes once every model is SERVING; fails at once, with
    ``log()``, if the process exits first (a crash ends the wait)."""

    def written() -> bool:
        if ready.exists():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"cellserve serve exited {proc.returncode} before it was ready: {log()}")
        return False

    WaitUntil()(written, timeout_s, poll_s=0.05, what=lambda: f"no ready file: {log()}")
    return json.loads(ready.read_text())
