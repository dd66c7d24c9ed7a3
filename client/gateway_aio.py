"""The asyncio gateway: the awaiting I/O shell over ``GatewayCore`` (see ``cellserve.client.gateway``).

Each stream's responses are read by a task into an inbox as they arrive. A call runs to its end in a task of
its own, one at a time: a caller cancelled mid-call stops waiting, but the call still completes (its outputs
are discarded, as a cancelled ``AsyncSession.step``'s), so a stream is never left half-resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from cellserve.client.aio_inbox import Inbox
from cellserve.client.connection_pool import unanswered
from cellserve.client.errors import UnavailableError
from cellserve.client.gateway import GatewayBase, amultiplex_on, new_core
from cellserve.client.gateway_core import GatewayCore
from cellserve.client.gateway_ops import (
    DEFAULT_SESSIONS_PER_STREAM,
    Describe,
    Ended,
    EndLane,
    GatewayReply,
    GatewayRoutine,
    Pause,
    PollOn,
    ReceiveOn,
    SendOn,
    StartLane,
)
from cellserve.client.model_info import ModelInfo
from cellserve.client.opening import Opening
from cellserve.client.ops import leave_async
from cellserve.v1 import cellserve_pb2 as pb

if TYPE_CHECKING:
    from cellserve.client.aio import AsyncClient

T = TypeVar("T")
__all__ = ["DEFAULT_SESSIONS_PER_STREAM", "AsyncGateway", "opening_gateway"]
_CALL_ERRORS = (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


class _Stream:
    """One lane's ``Multiplex`` call, and its responses as they arrive."""

    def __init__(self, target: str, call: grpc.aio.StreamStreamCall) -> None:
        self.target, self.call = target, call
        self.inbox = Inbox[pb.MultiplexResponse](call, "cellserve-gateway-reader")

    async def write(self, request: pb.MultiplexRequest) -> None:
        if self.call.done():
            return  # the next receive says how it ended
        with contextlib.suppress(*_CALL_ERRORS):
            await self.call.write(request)

    async def end(self, *, graceful: bool) -> None:
        if graceful and not self.call.done():
            with contextlib.suppress(*_CALL_ERRORS):
                await self.call.done_writing()
            return
        self.cancel()

    def cancel(self) -> None:
        self.call.cancel()


class AsyncGateway(GatewayBase):
    """The asyncio gateway: the sync ``Gateway``'s calls, awaited. ``async with`` closes every session."""

    def __init__(
        self,
        core: GatewayCore,
        start: Callable[..., Any],
        info_for: Callable[[str, str], Awaitable[ModelInfo]],
        metadata: tuple,
    ) -> None:
        super().__init__(core, start, metadata)
        self._info_for = info_for
        self._lock = asyncio.Lock()

    async def open(self, keys: Iterable[str], *, resume_tokens: Mapping[str, bytes] | None = None) -> list[str]:
        """As ``Gateway.open``."""
        return await self._run(self._core.open(keys, resume_tokens or {}))

    async def step(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        """As ``Gateway.step``: {key: [T, *out]}."""
        return await self._run(self._core.step(inputs))

    async def step_arrays(self, keys: Sequence[str], x: object) -> np.ndarray:
        """As ``Gateway.step_arrays``: [N, T, *out]."""
        return await self._run(self._core.step_arrays(keys, x))

    async def snapshot(self, keys: Iterable[str] | None = None) -> dict[str, bytes]:
        """As ``Gateway.snapshot``."""
        return await self._run(self._core.snapshot(keys))

    async def close(self, keys: Iterable[str] | None = None) -> None:
        """As ``Gateway.close``: these sessions, or (no keys) every one and the streams."""
        await self._run(self._core.close(keys) if keys is not None else self._core.shutdown())

    async def __aenter__(self) -> AsyncGateway:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await leave_async(self.close, self._abandon, exc)

    # -- performing the core's operations ---------------------------------------------------------

    async def _run(self, routine: GatewayRoutine[T]) -> T:
        """Run a call in a task of its own, after the calls before it; a cancelled caller leaves it running."""
        task: asyncio.Future[T] = asyncio.ensure_future(self._locked(routine))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a caller that left: nobody asks
        return await asyncio.shield(task)

    async def _locked(self, routine: GatewayRoutine[T]) -> T:
        async with self._lock:
            return await self._perform(routine)

    async def _perform(self, routine: GatewayRoutine[T]) -> T:
        reply: GatewayReply = None
        try:
            while True:
                op = routine.send(reply)
                reply = await getattr(self, op.handler)(op)
        except StopIteration as done:
            return done.value
        finally:
            routine.close()
            self._prune()

    async def _start_lane(self, op: StartLane) -> None:
        self._streams[op.lane] = _Stream(op.target, await self._start(op.target, metadata=self._metadata))

    async def _send_on(self, op: SendOn) -> None:
        stream = self._streams.get(op.lane)
        if stream is not None:
            await stream.write(op.request)

    async def _receive_on(self, op: ReceiveOn) -> GatewayReply:
        stream = self._streams[op.lane]
        reply = await stream.inbox.get(op.timeout_s)
        if reply is None:  # no answer in time: the target accepted the connection and hangs
            unanswered(stream.call)  # its worker takes no new stream for a while
            stream.cancel()
            return Ended(UnavailableError(f"{stream.target} did not answer within {op.timeout_s:g} s"))
        return reply

    async def _poll_on(self, op: PollOn) -> GatewayReply:
        return await self._streams[op.lane].inbox.get(wait=False)

    async def _end_lane(self, op: EndLane) -> None:
        stream = self._streams.pop(op.lane, None)
        if stream is not None:
            await stream.end(graceful=op.graceful)

    async def _describe(self, op: Describe) -> ModelInfo:
        return await self._info_for(op.model, op.target)

    async def _pause(self, op: Pause) -> None:
        await asyncio.sleep(op.seconds)


def opening_gateway(
    client: AsyncClient, model: str | None, keys: list[str], *, idle_timeout_s: int, checkpoint_every: int | None,
    sessions_per_stream: int, streams: int | None,
) -> Opening[AsyncGateway]:  # fmt: skip
    """``AsyncClient.gateway``: a gateway on ``client``'s targets that opens ``keys`` as it is awaited (``streams``
    None: one per worker behind the address, asked then)."""
    core = new_core(client, model, idle_timeout_s=idle_timeout_s, checkpoint_every=checkpoint_every,
                    sessions_per_stream=sessions_per_stream, streams=1 if streams is None else streams)  # fmt: skip

    async def opening() -> AsyncGateway:
        if streams is None:
            core.streams = await client._channels.pool(client._channels.current).abehind()
        gateway = AsyncGateway(core, amultiplex_on(client), client._model_info, client._metadata)
        if keys:
            try:
                await gateway.open(keys)
            except BaseException:
                await gateway.__aexit__(None, None, None)
                raise
        return gateway

    return Opening(opening)
