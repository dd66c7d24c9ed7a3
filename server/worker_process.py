"""The worker side of ``cellserve serve --workers N``: one serving process, started by the supervisor
(:mod:`cellserve.server.workers`).

It beats over its pipe from the start (a thread until it serves, then its event loop), says when it is
ready, serves on the shared port until SIGTERM/SIGINT, and dies with its supervisor: a SIGTERM that finds
the supervisor gone frees the port before the drain, so a replacement can bind at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection

from cellserve.server.heartbeat import Heartbeat
from cellserve.server.logs import configure_logging
from cellserve.server.settings import Settings

BEATS_PER_TIMEOUT = 5  # heartbeats sent per worker_heartbeat_timeout_s: a late one or two is no hang


def _die_with_parent(supervisor: int) -> None:
    """Linux: if the supervisor dies (SIGKILL, OOM), this worker gets SIGTERM and drains, instead of lingering.

    The signal is armed only now, a second or so after the spawn: a supervisor gone before that is caught
    by the parent check, and the worker leaves before it binds the port.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor:
        sys.exit(0)


def _supervisor_gone(supervisor: int) -> bool:
    """Whether the supervisor died or is dying: this worker was reparented, or the supervisor's main thread
    has exited. The death signal comes as soon as the thread that spawned the worker exits; the worker may
    stay the child of the supervisor's other threads a moment longer."""
    if os.getppid() != supervisor:
        return True
    try:
        with open(f"/proc/{supervisor}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # after "pid (comm)"
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")  # a zombie main thread: the process is exiting


class _WorkerField(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def worker_main(settings: Settings, index: int, count: int, ready: Connection, log_level: int, supervisor: int) -> None:
    """A worker process: serve on the shared port until SIGTERM/SIGINT; say when ready; beat meanwhile.

    A SIGTERM that finds the supervisor gone (PR_SET_PDEATHSIG) frees the port before the drain.
    """
    heartbeat = Heartbeat(ready, settings.worker_heartbeat_timeout_s / BEATS_PER_TIMEOUT)
    heartbeat.start()  # before the imports below, which take seconds on a busy machine
    import asyncio

    from cellserve.server.app import run_until_signal
    from cellserve.server.errors import EngineUnavailable

    _die_with_parent(supervisor)
    configure_logging(logging.getLevelName(log_level), settings.log_format).addFilter(_WorkerField(index))

    def on_ready(port: int, metrics_port: int) -> None:
        heartbeat.on_loop({"pid": os.getpid(), "port": port, "metrics_port": metrics_port})

    try:
        orphaned = functools.partial(_supervisor_gone, supervisor)
        asyncio.run(
            run_until_signal(settings, reuse_port=True, on_ready=on_ready, orphaned=orphaned, worker=(index, count))
        )
    except (OSError, ValueError, EngineUnavailable) as e:
        print(f"cellserve serve: error: worker {index}: {e}", file=sys.stderr)
        sys.exit(1)
