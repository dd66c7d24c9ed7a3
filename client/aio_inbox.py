"""An asyncio stream's responses, read by a task as they arrive, then how the stream ended (``Ended``).

The ``AsyncSession`` reads its ``Stream`` through one, the ``AsyncGateway`` each of its ``Multiplex`` streams.
Reading as responses arrive matters: a write that fails discards grpc's own buffer of unread responses, and
with it a ``draining`` the server pushed to an idle session.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

import grpc

from cellserve.client.errors import UnavailableError, error_class, from_rpc_error
from cellserve.client.ops import Ended

R = TypeVar("R")
CORE_WRITE_RACE = "Internal error from Core"  # grpc aio's status for a write on a stream that just died


class Inbox(Generic[R]):
    """The responses (``R``) of one call, as they arrive; then, for ever, how it ended."""

    def __init__(self, call: grpc.aio.StreamStreamCall, name: str) -> None:
        self._call = call
        self._queue: asyncio.Queue[R | grpc.RpcError | None] = asyncio.Queue()
        self._ended: Ended | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump(), name=name)

    async def _pump(self) -> None:
        end: grpc.RpcError | None = None
        try:
            while (resp := await self._call.read()) is not grpc.aio.EOF:
                self._queue.put_nowait(resp)
        except grpc.RpcError as e:
            end = e
        except (grpc.aio.UsageError, asyncio.InvalidStateError, asyncio.CancelledError):
            pass  # the call was cancelled (by us, or the loop is closing): the status says the rest
        self._queue.put_nowait(end)

    async def get(self, timeout_s: float | None = None, *, wait: bool = True) -> R | Ended | None:
        """The next response, or how the stream ended; None if none came within ``timeout_s`` (with ``wait``
        False: if none is in yet)."""
        if self._ended is not None:
            return self._ended
        try:
            if not wait:
                item = self._queue.get_nowait()
            elif timeout_s is None:
                item = await self._queue.get()
            else:
                item = await asyncio.wait_for(self._queue.get(), timeout_s)
        except (asyncio.QueueEmpty, TimeoutError):
            return None
        if item is not None and not isinstance(item, grpc.RpcError):
            return item
        self._ended = await self._how_it_ended(item)
        return self._ended

    async def _how_it_ended(self, end: grpc.RpcError | None) -> Ended:
        """The reader's error, else the call's status (read from the call: the reader saw an end without one)."""
        if isinstance(end, grpc.RpcError):
            error = from_rpc_error(end)
        else:
            code = await self._call.code()
            if code is None or code == grpc.StatusCode.OK:
                return Ended()
            error = error_class(code)((await self._call.details()) or "", code)
        if error.code == grpc.StatusCode.INTERNAL and error.details == CORE_WRITE_RACE:
            # grpc aio's status for a write that raced the end of the stream (grpc/grpc#36066); never a
            # server's: the stream died under the write, i.e. the server is gone
            error = UnavailableError("the stream ended while a request was being written (server gone?)")
        return Ended(error)
