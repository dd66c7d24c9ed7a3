"""asyncio client: the awaiting I/O shell over ``SessionCore`` (``step``, or pipelined ``send`` +
``async for``), generate, models, health.

Each stream's responses are read by a reader task into an inbox as they arrive, so a ``draining``
pushed to an idle session is already in hand when the next call looks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from cellserve.client.aio_inbox import Inbox
from cellserve.client.channel import ChannelConfig
from cellserve.client.client import ClientBase, Generated, generate_request, health_name, unknown_health_service
from cellserve.client.connection_pool import ask_worker_aio, unanswered
from cellserve.client.core import SessionCore
from cellserve.client.errors import NotFoundError, UnavailableError, from_rpc_error
from cellserve.client.gateway_aio import DEFAULT_SESSIONS_PER_STREAM, AsyncGateway, opening_gateway
from cellserve.client.model_info import ModelInfo
from cellserve.client.opening import Opening
from cellserve.client.ops import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RESUME_TIMEOUT_S,
    Ended,
    Finish,
    Open,
    Pause,
    Receive,
    Reply,
    Room,
    Routine,
    Send,
    SessionPolicy,
    leave_async,
)
from cellserve.client.replies import StepOutput, is_opened
from cellserve.client.session_base import SessionBase
from cellserve.client.trace_context import trace_metadata
from cellserve.v1 import cellserve_pb2 as pb

T = TypeVar("T")


class AsyncSession(SessionBase):
    """An asyncio session.

    One at a time: ``y = await s.step(x)``. Pipelined: ``await s.send(x)`` any number of chunks from
    one task and ``async for out in s`` (``out.seq``, ``out.y``) in another; ``await s.end()`` asks the
    server to close after the steps already sent, which ends the iteration. A ``StepRejected`` raised
    by the iteration concerns that step only: catch it and keep iterating. Both ways survive a drain or
    a crash of the server like the sync ``Session``. ``async with`` closes the session on the way out.
    """

    def __init__(self, core: SessionCore, stream: Callable[..., Any], metadata: tuple, open_timeout_s: float) -> None:
        super().__init__(core)
        self._stream = stream  # starts a Stream call on a target: Channels.astream (a connection of its pool)
        self._metadata = metadata + trace_metadata()  # the caller's span, as the session opens: its stream's parent
        self._open_timeout_s = open_timeout_s
        self._call: grpc.aio.StreamStreamCall | None = None
        self._inbox: Inbox[pb.StreamResponse] | None = None
        self._generation = 0  # of the current stream (see ops.Send)
        self._lock = asyncio.Lock()  # held while performing anything but a wait: writes never interleave
        self._writing: asyncio.Future | None = None  # a shielded write that may outlive a cancelled caller
        self._room = asyncio.Event()  # set whenever a response was read (pipelined send waits on it)

    @classmethod
    async def open(
        cls,
        core: SessionCore,
        stream: Callable[..., Any],
        info_for: Callable[[str, str], Awaitable[ModelInfo]],
        metadata: tuple,
        open_timeout_s: float,
        start: int,
    ) -> AsyncSession:
        """Open on the first target from ``start`` that takes the session, and learn its model."""
        session = cls(core, stream, metadata, open_timeout_s)
        await session._perform(core.open(start))
        try:
            session.info = await info_for(core.model, core.target)
        except BaseException:
            session._cancel()
            raise
        return session

    async def step(self, x: object) -> np.ndarray:
        """Send one chunk and wait for its output [T, O] (no pipelined step may be unanswered).

        Cancelled, the step may still run on the server: its output is then discarded and the session
        goes on from the state after it.
        """
        return await self._perform(self._core.step(self._checked(x)))

    async def send(self, x: object) -> int:
        """Send one chunk without waiting for its output; returns its seq. Waits while
        ``max_in_flight`` steps are unanswered (read them with ``async for`` from another task)."""
        return await self._perform(self._core.send(self._checked(x)))

    async def snapshot(self) -> bytes:
        """An exact resume token of the current state (servers without resume answer UNIMPLEMENTED)."""
        return await self._perform(self._core.snapshot())

    async def end(self) -> None:
        """Ask the server to close once the steps already sent are answered (ends ``async for``)."""
        await self._perform(self._core.end())

    async def close(self) -> None:
        """Close now (outputs not yet read are discarded), wait for ``closed``, half-close. Idempotent."""
        await self._perform(self._core.close())

    def __aiter__(self) -> AsyncSession:
        return self

    async def __anext__(self) -> StepOutput:
        out = await self._perform(self._core.next_output())
        if out is None:
            raise StopAsyncIteration
        return out

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await leave_async(self.close, self._cancel, exc)

    # -- performing the core's operations ---------------------------------------------------------

    async def _perform(self, routine: Routine[T]) -> T:
        """Run a core routine. The lock is held across every operation but the waits (Receive, Room), so
        a resume's open and replay, and each write, happen without another task's write in between."""
        reply: Reply = None
        held = False
        try:
            while True:
                op = routine.send(reply)
                waits = isinstance(op, (Receive, Room))
                if held and waits:
                    held = False
                    self._lock.release()
                elif not held and not waits:
                    await self._lock.acquire()
                    held = True
                reply = await getattr(self, op.handler)(op)
        except StopIteration as done:
            return done.value
        finally:
            routine.close()
            if held:
                self._release_after_write()
            self._room.set()  # a sender waiting for room looks again (the session may have ended)

    def _release_after_write(self) -> None:
        if self._writing is not None and not self._writing.done():  # cancelled mid-write: wait for it
            self._writing.add_done_callback(lambda _: self._lock.release())
        else:
            self._lock.release()

    async def _open_stream(self, op: Open) -> Reply:
        target = self._core.targets[op.index]
        call = await self._stream(target, metadata=self._metadata)
        inbox = Inbox[pb.StreamResponse](call, "cellserve-session-reader")
        try:
            reply = await asyncio.wait_for(self._first_reply(call, inbox, op.request), self._open_timeout_s)
        except TimeoutError:
            unanswered(call)  # its worker takes no new session for a while (a hung --workers process)
            reply = Ended(UnavailableError(f"{target} did not answer the open within {self._open_timeout_s:g} s"))
        except BaseException:
            call.cancel()
            raise
        if not is_opened(reply):
            call.cancel()
            return reply
        self._cancel()  # the stream it replaces (gone, or draining)
        self._call, self._inbox, self._generation = call, inbox, op.generation
        return reply

    async def _first_reply(
        self, call: grpc.aio.StreamStreamCall, inbox: Inbox[pb.StreamResponse], request: pb.StreamRequest
    ) -> Reply:
        try:
            await call.write(request)
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the status comes through the inbox
        return await inbox.get()

    async def _send(self, op: Send) -> None:
        if op.generation != self._generation or self._call is None or self._call.done():
            return  # replaced while this waited (the replay sent it), or gone (the next Receive says so)
        self._writing = asyncio.ensure_future(self._call.write(op.request))
        try:
            await asyncio.shield(self._writing)  # a cancelled caller must not cancel the call
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream died under the write: the next Receive reports how

    async def _receive(self, op: Receive) -> Reply:
        assert self._inbox is not None and self._call is not None
        reply = await self._inbox.get()
        self._room.set()
        return reply

    async def _wait_for_room(self, op: Room) -> None:
        self._room.clear()
        await self._room.wait()

    async def _pause(self, op: Pause) -> None:
        await asyncio.sleep(op.seconds)

    async def _finish(self, op: Finish) -> None:
        if self._call is not None and not self._call.done():
            try:
                await self._call.done_writing()
            except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass

    def _cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()


class AsyncClient(ClientBase[grpc.aio.Channel]):
    """asyncio client; the same arguments as ``Client``, plus ``max_in_flight`` for pipelined sessions.
    Use ``async with AsyncClient(...) as client, client.session("m") as s``."""

    def __init__(
        self, target: str | Sequence[str], config: ChannelConfig | None = None, *, timeout_s: float = 30.0,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:  # fmt: skip
        policy = SessionPolicy(checkpoint_every, resume_timeout_s, max_in_flight)
        super().__init__(
            target, config, ChannelConfig.aio_channel, ask_worker_aio, timeout_s=timeout_s, policy=policy
        )

    async def close(self) -> None:
        for channel in self._channels.close():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def session(
        self, model: str | None = None, *, idle_timeout_s: int = 0, resume_token: bytes = b"",
        checkpoint_every: int | None = None,
    ) -> Opening[AsyncSession]:  # fmt: skip
        """Open a session: ``async with client.session("m") as s`` (or ``s = await client.session("m")``).

        Skips UNAVAILABLE targets, as ``Client.session`` does; an open waits at most ``open_timeout_s``
        (``config.connect_timeout_s``, or ``timeout_s`` if smaller).
        """

        async def opening() -> AsyncSession:
            core = self._core(model, idle_timeout_s, resume_token, checkpoint_every)
            start = self._channels.preferred  # read now: other tasks may open sessions meanwhile
            session = await AsyncSession.open(
                core, self._channels.astream, self._model_info, self._metadata, self.open_timeout_s, start
            )
            self._opened_on(core)
            return session

        return Opening(opening)

    def gateway(
        self, model: str | None = None, *, keys: Iterable[str] = (), idle_timeout_s: int = 0,
        checkpoint_every: int | None = None, sessions_per_stream: int = DEFAULT_SESSIONS_PER_STREAM,
        streams: int | None = None,
    ) -> Opening[AsyncGateway]:  # fmt: skip
        """As ``Client.gateway``: ``async with client.gateway("m", keys=...) as gw`` (or ``gw = await ...``)."""
        options = {"idle_timeout_s": idle_timeout_s, "checkpoint_every": checkpoint_every, "streams": streams}
        return opening_gateway(self, model, list(keys), sessions_per_stream=sessions_per_stream, **options)

    async def generate(
        self, prompt: str, max_tokens: int = 200, *, temperature: float = 0.8, top_k: int = 0,
        seed: int | None = None, model: str | None = None,
    ) -> AsyncIterator[Generated]:  # fmt: skip
        """Stream generated tokens as the server produces them."""
        request = generate_request(prompt, max_tokens, temperature, top_k, seed, model or "")
        call = await self._channels.astart(self._channels.current, "Generate", request, metadata=self._metadata)
        try:
            async for resp in call:
                yield Generated(tuple(resp.token_ids), resp.text)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def list_models(self) -> list[ModelInfo]:
        return self._remember(await self._call("ListModels", pb.ListModelsRequest()))

    async def model_info(self, name: str) -> ModelInfo:
        return await self._model_info(name, self._channels.current)

    async def _model_info(self, name: str, target: str) -> ModelInfo:
        if name not in self._infos:
            self._remember(await self._call("ModelInfo", pb.ModelInfoRequest(model=name), target))
        return self._infos[name]

    async def health(self, service: str = "") -> str:
        """As ``Client.health``."""
        try:
            return health_name((await self._call("Check", health_pb2.HealthCheckRequest(service=service))).status)
        except NotFoundError:
            raise unknown_health_service(service) from None

    async def _call(self, method: str, request: Any, target: str | None = None) -> Any:
        try:
            return await self._unary(method, request, target)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
