"""A ``--workers`` worker's heartbeat: proof to its supervisor that the worker's event loop still turns.

The worker writes a tiny message on the pipe it shares with the supervisor every ``interval_s``. While it
starts (interpreter, imports, loading and warming models, which may block the loop) a thread sends them,
so that only a stopped or frozen process goes silent; once it serves, a task on its event loop does, so a
loop blocked in a native call goes silent too. The supervisor (``workers.py``) kills a silent worker.

The write end is non-blocking and each message is one write of a few bytes (atomic on a pipe): a
supervisor that stopped reading, or died, never blocks the worker's loop; its beats are then dropped.
"""

from __future__ import annotations

import asyncio
import os
import threading
from multiprocessing.connection import Connection

BEAT = "beat"  # the heartbeat message; the only other one on the pipe is the worker's ready dict


class Heartbeat:
    """The sending side: ``start()`` at once, ``on_loop()`` from the event loop once the worker serves."""

    def __init__(self, conn: Connection, interval_s: float) -> None:
        self.interval_s = interval_s
        self._conn = conn
        os.set_blocking(conn.fileno(), False)
        self._loop_beats = threading.Event()  # set when the event loop takes over: the thread ends
        self._thread = threading.Thread(target=self._beat_while_starting, name="cellserve-heartbeat", daemon=True)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._thread.start()

    def send(self, message: object) -> bool:
        """Write one message; False if the pipe is full (the supervisor is not reading) or gone."""
        try:
            self._conn.send(message)
        except OSError:  # BlockingIOError, BrokenPipeError: nobody to tell, and never worth blocking for
            return False
        return True

    def on_loop(self, ready: object) -> None:
        """Call on the running event loop: send ``ready``, then beat from the loop instead of the thread."""
        self._loop_beats.set()
        self._thread.join()  # wakes at once from its wait: the two never write at the same time
        self.send(ready)
        self._task = asyncio.get_running_loop().create_task(self._beat_on_loop(), name="cellserve-heartbeat")

    def _beat_while_starting(self) -> None:
        while True:
            self.send(BEAT)
            if self._loop_beats.wait(self.interval_s):
                return

    async def _beat_on_loop(self) -> None:
        while True:
            self.send(BEAT)
            await asyncio.sleep(self.interval_s)
