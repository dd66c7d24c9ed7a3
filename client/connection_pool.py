"""One target's connections: a few channels, each its own TCP connection, with the streams spread over them.

Why several: behind one address may be several processes (``cellserve serve --workers N`` shares one port
with SO_REUSEPORT). The kernel balances *connections* over them, not the streams on a connection, and
gRPC gives every channel to one target in a process the same connection (its global subchannel pool). With
one connection, every session of a process lands on one worker. So each channel of a pool has its own
subchannel pool (``grpc.use_local_subchannel_pool``, set by ``ChannelConfig.options``), and each new stream
goes to the connection carrying the fewest open streams (ties in turn, so that an open retried after a
connection that did not answer tries the next one). Which worker each connection reaches is the kernel's
choice (a hash of the address pair), so N connections miss one of two workers with probability 2^(1-N).

Connections are made on first use: a client with one session at a time holds few. Unary calls (models,
health) use the first; they carry no state, any worker answers them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

C = TypeVar("C")  # grpc.Channel or grpc.aio.Channel


class ConnectionPool(Generic[C]):
    """Up to ``size`` channels to ``target`` and the streams open on each (see the module docstring)."""

    def __init__(self, target: str, size: int, make: Callable[[str], C]) -> None:
        if size < 1:
            raise ValueError(f"a connection pool of {size} channels; use 1 or more")
        self.target = target
        self._make = make
        self._channels: list[C | None] = [None] * size
        self._stubs: list[pb_grpc.CellServeStub | None] = [None] * size
        self._open = [0] * size  # streams started on each connection and not yet done
        self._next = 0  # where the search for the least-loaded connection starts: ties go in turn
        self._lock = threading.Lock()  # sync sessions open from many threads; grpc calls done-callbacks on its own
        self.channel(0)

    def channel(self, index: int = 0) -> C:
        """The ``index``-th connection's channel, made now if it is not yet."""
        channel = self._channels[index]
        if channel is None:
            channel = self._channels[index] = self._make(self.target)
        return channel

    def stub(self, index: int = 0) -> pb_grpc.CellServeStub:
        stub = self._stubs[index]
        if stub is None:
            stub = self._stubs[index] = pb_grpc.CellServeStub(self.channel(index))
        return stub

    def start(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start a streaming call (``Stream``, ``Generate``) on the connection with the fewest open streams.

        The call counts against its connection until it is done, however it ends (closed, cancelled, reset).
        """
        with self._lock:
            size = len(self._open)
            index = min(((self._next + k) % size for k in range(size)), key=self._open.__getitem__)
            self._next = (index + 1) % size
            self._open[index] += 1
            stub = self.stub(index)
        try:
            call = getattr(stub, method)(*args, **kwargs)
        except BaseException:
            self._done(index)
            raise
        call.add_done_callback(lambda _call: self._done(index))
        return call

    def _done(self, index: int) -> None:
        with self._lock:
            self._open[index] -= 1

    def open_streams(self) -> list[int]:
        """Streams open on each connection now (0 for one not made yet)."""
        with self._lock:
            return list(self._open)

    def channels(self) -> list[C]:
        """The channels made so far."""
        return [c for c in self._channels if c is not None]
