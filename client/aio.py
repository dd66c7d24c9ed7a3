"""asyncio client: sessions with pipelined sends (``async for`` over outputs), generate, models, health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from cellserve.client.channel import ChannelConfig, Channels, normalize_targets
from cellserve.client.client import Generated, generate_request, health_name
from cellserve.client.errors import (
    CellserveClientError,
    DataLossError,
    FailedPreconditionError,
    StepRejected,
    UnavailableError,
    error_class,
    from_rpc_error,
)
from cellserve.client.model_info import ModelInfo
from cellserve.client.protocol import ResumeAttempt, SessionState, StepOutput
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

CORE_WRITE_RACE = "Internal error from Core"  # grpc aio's status for a write on a stream that just died
LEAVE_TIMEOUT_S = 10.0  # after a move: how long the old server may take to confirm the close


class _Inbox:
    """Reads a stream's responses as they arrive, so a `draining` pushed to an idle session is already
    in hand when the next write finds the stream ended (a failed write discards grpc's own buffer)."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._queue: asyncio.Queue[pb.StreamResponse | grpc.RpcError | None] = asyncio.Queue()
        self._end: grpc.RpcError | None = None
        self._ended = False
        self._task = asyncio.get_running_loop().create_task(self._pump(call), name="cellserve-session-reader")

    async def _pump(self, call: grpc.aio.StreamStreamCall) -> None:
        end: grpc.RpcError | None = None
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                self._queue.put_nowait(resp)
        except grpc.RpcError as e:
            end = e
        except (grpc.aio.UsageError, asyncio.InvalidStateError, asyncio.CancelledError):
            pass  # the call was cancelled (by us, or the loop is closing): the status says the rest
        self._queue.put_nowait(end)

    async def get(self) -> pb.StreamResponse | grpc.RpcError | None:
        """The next response; then, for ever, how the stream ended (None: without an error status)."""
        if self._ended:
            return self._end
        item = await self._queue.get()
        if not isinstance(item, pb.StreamResponse):
            self._ended, self._end = True, item
        return item

    def received(self) -> list[pb.StreamResponse]:
        """Responses already received and not yet taken (never waits)."""
        out = []
        while not self._ended and not self._queue.empty():
            item = self._queue.get_nowait()
            if not isinstance(item, pb.StreamResponse):
                self._ended, self._end = True, item
                break
            out.append(item)
        return out


class AsyncSession:
    """An asyncio session.

    One at a time: ``y = await s.step(x)``. Pipelined: ``await s.send(x)`` any number of chunks from
    one task and ``async for out in s`` (``out.seq``, ``out.y``) in another; ``await s.end()`` asks the
    server to close after the steps already sent, which ends the iteration. A ``StepRejected`` raised
    by the iteration concerns that step only: catch it and keep iterating. ``async with`` closes the
    session on the way out, also on exceptions.
    """

    def __init__(
        self,
        state: SessionState,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        connect: Callable[[str], pb_grpc.CellServeStub] | None = None,
    ) -> None:
        self.state = state
        self.info: ModelInfo | None = None
        self._metadata = metadata
        self._connect = connect  # stub for another target: enables transparent resume on drain
        self._target = 0  # index in state.targets of the server holding the session
        self._lost: CellserveClientError | None = None  # why a failed move ended the session
        self._abandoned: set[int] = set()  # seqs of steps whose caller was cancelled
        self._call: grpc.aio.StreamStreamCall | None = None
        self._inbox: _Inbox | None = None
        self._close_sent = False
        self._done_writing = False
        self._failed = False  # the stream ended with an error status: nothing left to close

    @classmethod
    async def open(
        cls,
        stub: pb_grpc.CellServeStub,
        info_for: Callable[[str], Awaitable[ModelInfo]],
        state: SessionState,
        *,
        model: str,
        idle_timeout_s: int,
        resume_token: bytes,
        metadata: tuple[tuple[str, str], ...],
        connect: Callable[[str], pb_grpc.CellServeStub] | None = None,
        target: int = 0,
    ) -> AsyncSession:
        session = cls(state, metadata=metadata, connect=connect)
        session._target = target
        await session._open_on(stub, model, idle_timeout_s, resume_token)
        try:
            session.info = await info_for(state.model)
        except BaseException:
            session._stream.cancel()
            raise
        return session

    async def _open_on(self, stub: pb_grpc.CellServeStub, model: str, idle_timeout_s: int, token: bytes) -> None:
        self._call = stub.Stream(metadata=self._metadata)
        self._inbox = _Inbox(self._call)
        self._close_sent = self._done_writing = self._failed = False
        try:
            await self._write(self.state.open_request(model, idle_timeout_s, token))
            self.state.on_opened(await self._read())
        except BaseException:
            self._stream.cancel()
            raise

    @property
    def _stream(self) -> grpc.aio.StreamStreamCall:
        assert self._call is not None, "session not opened"
        return self._call

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def steps(self) -> int:
        return self.state.steps

    async def send(self, x: object) -> int:
        """Send one chunk without waiting for its output; returns its seq."""
        assert self.info is not None
        if self._close_sent:
            raise FailedPreconditionError("end() or close() was called; this session takes no more steps")
        req = self.state.step_request(self.info.check_input(x))
        await self._write(req)
        return req.step.seq

    async def step(self, x: object) -> np.ndarray:
        """Send one chunk and wait for its output [T, O] (use with no other steps pending).

        With several targets, a session whose server drains moves to the next one on its own, as in
        the sync ``Session.step`` (pipelined ``send``/``async for`` does not move: watch ``state.draining``).
        """
        if self._lost is not None:
            raise self._lost
        if self._abandoned:
            await self._discard_abandoned()
        if self.state.pending:
            raise FailedPreconditionError("step() with pipelined steps pending; read them with `async for` first")
        assert self.info is not None
        if self._close_sent:
            raise FailedPreconditionError("end() or close() was called; this session takes no more steps")
        req = self.state.step_request(self.info.check_input(x))
        try:
            return await self._step(req)
        except asyncio.CancelledError:
            # The request may have reached the server, which then runs the step: its output is
            # discarded when it arrives, and the session goes on from the state after it.
            if req.step.seq in self.state.pending:
                self._abandoned.add(req.step.seq)
            raise

    async def _step(self, req: pb.StreamRequest) -> np.ndarray:
        seq = req.step.seq
        await self._send_or_resume(req)
        while True:
            try:
                resp = await self._read()
            except UnavailableError:
                if not self._can_resume():
                    raise
                await self._resume_elsewhere(self.state.resume_token)  # the token predates this step:
                await self._send_or_resume(req)  # send it again from the token's state
                continue
            out = self.state.on_response(resp)
            if out is not None:
                if out.seq != seq:
                    raise UnavailableError(f"server answered seq {out.seq} while seq {seq} was expected")
                if self.state.draining and self._can_resume():
                    await self._move()
                return out.y
            if self.state.closed_reason is not None:
                if self.state.closed_reason == "drain" and self._can_resume():
                    await self._resume_elsewhere(self.state.resume_token)
                    await self._send_or_resume(req)
                    continue
                raise self.state.closed_error()

    async def _discard_abandoned(self) -> None:
        """Read and drop the outputs of steps whose caller was cancelled."""
        while self._abandoned & self.state.pending.keys():
            try:
                out = self.state.on_response(await self._read())
            except StepRejected as e:
                self._abandoned.discard(e.seq)
                continue
            if out is not None:
                self._abandoned.discard(out.seq)
            elif self.state.closed_reason is not None:
                raise self.state.closed_error()
        self._abandoned.clear()

    async def _send_or_resume(self, req: pb.StreamRequest) -> None:
        try:
            await self._write(req)
        except UnavailableError:
            await self._absorb_rest()  # a `draining` token may be waiting behind the end of the stream
            if not self._can_resume():
                raise
            await self._resume_elsewhere(self.state.resume_token)
            await self._write(req)

    async def snapshot(self) -> bytes:
        """Ask for a resume token of the current state (servers without resume answer UNIMPLEMENTED)."""
        await self._write(self.state.snapshot_request())
        while True:
            resp = await self._read()
            self.state.on_response(resp)
            if resp.WhichOneof("kind") == "snapshot":
                return resp.snapshot.token
            if self.state.closed_reason is not None:
                raise self.state.closed_error()

    def __aiter__(self) -> AsyncSession:
        return self

    async def __anext__(self) -> StepOutput:
        while self.state.closed_reason is None:
            try:
                resp = await self._read()
            except UnavailableError:
                if self._close_sent:
                    raise StopAsyncIteration from None
                raise
            out = self.state.on_response(resp)  # StepRejected for a rejected step
            if out is not None:
                return out
        if self.state.pending and self.state.closed_reason != "client":
            raise self.state.closed_error()
        raise StopAsyncIteration

    async def end(self) -> None:
        """Ask the server to close once the steps already sent are answered."""
        if not self._close_sent and self.state.closed_reason is None:
            self._close_sent = True
            await self._write(self.state.close_request())

    async def close(self) -> None:
        """``end()``, discard outputs still pending, wait for ``closed``, half-close. Idempotent."""
        try:
            if self._failed:
                return
            await self.end()
            while self.state.closed_reason is None:
                try:
                    resp = await self._read()
                except UnavailableError:
                    break
                if resp.WhichOneof("kind") != "error":
                    self.state.on_response(resp)
        finally:
            await self._half_close()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.close()
            return
        try:  # never mask the original exception
            await self.close()
        except CellserveClientError:
            self._stream.cancel()

    # -- transparent resume -----------------------------------------------------------------------

    def _can_resume(self) -> bool:
        return self._connect is not None and bool(self.state.resume_token) and len(self.state.targets) > 1

    async def _move(self) -> None:
        """The server is draining: take an exact token, open on another target, then leave this one.

        If no other target takes the session it stays here (served until the grace period ends) and
        the next step tries again.
        """
        try:
            token = await self.snapshot()
        except CellserveClientError:  # the grace ended first (closed, or the server stopped)
            self._failed = True
            try:  # the draining token is what is left; it is current unless a step was answered after it
                await self._resume_elsewhere(self.state.resume_token)
            except (UnavailableError, DataLossError) as e:
                self._lost = e  # this step's output is still good: the next step reports the loss
            return
        here = (self._call, self._inbox, self.state.session_id, self._target)
        try:
            await self._resume_elsewhere(token, leave_current=False)
        except BaseException as e:  # nobody took it, or cancelled mid-move: stay here
            if self._call is not here[0]:
                self._stream.cancel()  # a half-opened stream on the other server
            self._call, self._inbox, self.state.session_id, self._target = here
            self._close_sent = self._done_writing = self._failed = False
            self.state.closed_reason, self.state.draining = None, True
            if isinstance(e, (UnavailableError, DataLossError)):
                return
            raise
        old, old_inbox = here[0], here[1]
        assert old is not None and old_inbox is not None
        try:  # leave the old server: `close`, half-close, read to the end (its slot is then free)
            await old.write(self.state.close_request())
            await old.done_writing()
            while isinstance(await asyncio.wait_for(old_inbox.get(), LEAVE_TIMEOUT_S), pb.StreamResponse):
                pass
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TimeoutError):
            old.cancel()
        except BaseException:  # cancelled while leaving: the session already lives on the new server
            old.cancel()
            raise

    async def _resume_elsewhere(self, token: bytes, *, leave_current: bool = True) -> None:
        """Open the session on the other targets in turn with ``token``; UnavailableError if none takes it."""
        assert self._connect is not None
        if leave_current:
            await self._half_close()
            self._stream.cancel()
        attempt = ResumeAttempt(self.state, self._target)
        for index in attempt.candidates():
            try:
                await self._open_on(
                    self._connect(self.state.targets[index]), self.state.model, self.state.idle_timeout_s, token
                )
            except CellserveClientError as e:
                attempt.failed(index, e)
                continue
            self._target = index
            if (stale := attempt.stale(index)) is not None:
                await self.close()
                raise stale
            return
        raise attempt.give_up()

    # -- internals --------------------------------------------------------------------------------

    async def _absorb_rest(self) -> None:
        """The stream ended under a write: apply what the server sent before its end (``draining``, ``closed``)."""
        assert self._inbox is not None
        for resp in self._inbox.received():
            if resp.WhichOneof("kind") in ("draining", "snapshot", "closed"):
                self.state.on_response(resp)

    async def _write(self, req: pb.StreamRequest) -> None:
        if self._stream.done():  # the server already ended the stream: report its status, don't write
            self._failed = True
            raise await self._status_error()
        try:
            await asyncio.shield(self._stream.write(req))  # a cancelled caller must not cancel the call
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            # Report the status the RPC ended with. A write that races the server's end of the stream
            # can replace that status with INTERNAL "Internal error from Core" inside grpc's aio
            # client (grpc/grpc#36066); the blocking Client is not affected. That status never comes
            # from a server: it means the stream died under the write, i.e. the server is gone.
            self._failed = True
            err = await self._status_error()
            if err.code == grpc.StatusCode.INTERNAL and err.details == CORE_WRITE_RACE:
                raise UnavailableError("the stream ended while a request was being written (server gone?)") from None
            raise err from None

    async def _read(self) -> pb.StreamResponse:
        assert self._inbox is not None
        item = await self._inbox.get()
        if isinstance(item, pb.StreamResponse):
            return item
        self._failed = True
        if isinstance(item, grpc.RpcError):
            raise from_rpc_error(item)
        raise await self._status_error()

    async def _status_error(self) -> CellserveClientError:
        code = await self._stream.code()
        if code is not None and code != grpc.StatusCode.OK:
            details = await self._stream.details()
            return error_class(code)(details or "", code)
        return UnavailableError("the server ended the stream")

    async def _half_close(self) -> None:
        if not self._done_writing:
            self._done_writing = True
            try:
                await self._stream.done_writing()
            except (grpc.RpcError, grpc.aio.UsageError):
                pass


class AsyncClient:
    """asyncio client; same arguments as ``Client``. Use ``async with AsyncClient(...) as c``."""

    def __init__(
        self, target: str | Sequence[str], config: ChannelConfig | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.targets = normalize_targets(target)
        self.config = config or ChannelConfig()
        self.timeout_s = timeout_s
        self._metadata = self.config.call_metadata()
        self._channels: Channels[grpc.aio.Channel] = Channels(self.targets, self.config.aio_channel)
        self._infos: dict[str, ModelInfo] = {}

    async def close(self) -> None:
        for channel in self._channels.all():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def session(
        self, model: str | None = None, *, idle_timeout_s: int = 0, resume_token: bytes = b""
    ) -> AsyncSession:
        """Open a session: ``async with await client.session("m") as s``. Skips UNAVAILABLE targets, as
        ``Client.session`` does."""
        start, errors = self._channels.preferred, []
        for k in range(len(self.targets)):
            index = (start + k) % len(self.targets)  # local: other tasks may open sessions meanwhile
            target = self.targets[index]
            try:
                await asyncio.wait_for(self._channels.channel(target).channel_ready(), self.timeout_s)
            except TimeoutError:
                errors.append(f"{target}: not connected within {self.timeout_s} s")
                continue
            try:
                session = await AsyncSession.open(
                    self._channels.stub(target),
                    lambda name, target=target: self._model_info(name, target),
                    SessionState(targets=self.targets),
                    model=model or "",
                    idle_timeout_s=idle_timeout_s,
                    resume_token=resume_token,
                    metadata=self._metadata,
                    connect=self._channels.stub,
                    target=index,
                )
            except UnavailableError as e:
                errors.append(f"{target}: {e.details}")
                continue
            self._channels.preferred = index
            return session
        raise UnavailableError("no server took the session: " + "; ".join(errors))

    async def generate(
        self,
        prompt: str,
        max_tokens: int = 200,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        seed: int | None = None,
        model: str | None = None,
    ) -> AsyncIterator[Generated]:
        """Stream generated tokens as the server produces them."""
        call = self._channels.current_stub().Generate(
            generate_request(prompt, max_tokens, temperature, top_k, seed, model or ""), metadata=self._metadata
        )
        try:
            async for resp in call:
                yield Generated(tuple(resp.token_ids), resp.text)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def list_models(self) -> list[ModelInfo]:
        try:
            resp = await self._channels.current_stub().ListModels(
                pb.ListModelsRequest(), metadata=self._metadata, timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        infos = [ModelInfo.from_proto(m) for m in resp.models]
        self._infos.update({i.name: i for i in infos})
        return infos

    async def model_info(self, name: str) -> ModelInfo:
        return await self._model_info(name, self._channels.current)

    async def _model_info(self, name: str, target: str) -> ModelInfo:
        if name not in self._infos:
            try:
                resp = await self._channels.stub(target).ModelInfo(
                    pb.ModelInfoRequest(model=name), metadata=self._metadata, timeout=self.timeout_s
                )
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            self._infos[name] = ModelInfo.from_proto(resp.model)
        return self._infos[name]

    async def health(self, service: str = "") -> str:
        try:
            resp = await self._channels.health().Check(
                health_pb2.HealthCheckRequest(service=service), metadata=self._metadata, timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_name(resp.status)
