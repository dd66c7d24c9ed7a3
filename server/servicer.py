"""The native ``cellserve.v1.CellServe`` service: protobuf ↔ domain objects, and nothing else.

A stream's first message opens its session; after that a reader task feeds requests (with a small
read-ahead) and the session's server-side events into one inbox, which this handler serves in
order. Clean-up (closing the session, freeing its slot) is in ``finally``, so it also runs on
cancel and disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from cellserve.server.errors import (
    CellserveError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    abort,
    to_status,
)
from cellserve.server.metrics import Metrics
from cellserve.server.models import LoadedModel, ModelRepository
from cellserve.server.resume_token import TokenCodec
from cellserve.server.sessions import DrainNotice, Session, SessionClosed, SessionManager
from cellserve.server.settings import Settings
from cellserve.server.tensors import PB_DTYPES, to_numpy, to_proto
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

READ_AHEAD = 2  # requests read from the wire before the previous one is answered
# After `closed`, the stream stays open this long for the client's half-close; a message sent on it
# in that time is answered FAILED_PRECONDITION (step after close), then the stream ends.
CLOSE_LINGER_S = 5.0
CLOSE_REASONS = {"client": pb.CLOSE_REASON_CLIENT, "idle": pb.CLOSE_REASON_IDLE, "drain": pb.CLOSE_REASON_DRAIN}
# Errors of a single step: answered in-stream, the session goes on.
STEP_ERRORS = (InvalidArgument, ResourceExhausted)
SERVER_CLOSES = ("drain", "idle")  # close reasons the server decides (the client may not know yet)


@dataclass(frozen=True)
class _EndOfRequests:
    error: BaseException | None = None


class CellServeServicer(pb_grpc.CellServeServicer):
    """Native API servicer."""

    def __init__(self, sessions: SessionManager, settings: Settings, metrics: Metrics, tokens: TokenCodec) -> None:
        self.sessions = sessions
        self.tokens = tokens
        self.models: ModelRepository = sessions.models
        self.settings = settings
        self.metrics = metrics
        self.active_streams = 0

    # -- Stream -----------------------------------------------------------------------------------

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        inbox: asyncio.Queue[pb.StreamRequest | SessionClosed | DrainNotice | _EndOfRequests] = asyncio.Queue()
        credit = asyncio.Semaphore(READ_AHEAD)
        reader = asyncio.create_task(_pump(request_iterator, inbox, credit))
        session: Session | None = None
        reason = "disconnect"
        self.active_streams += 1
        try:
            if self.active_streams > self.settings.max_streams:
                raise ResourceExhausted(
                    f"server has {self.settings.max_streams} streams open (setting max_streams); retry later"
                )
            first = await inbox.get()
            session = self._open(first, inbox)
            yield pb.StreamResponse(
                opened=pb.Opened(
                    session_id=session.id,
                    model=session.model.name,
                    idle_timeout_s=session.idle_timeout_s,
                    steps=session.steps,
                    model_sha256=session.model.manifest.sha256,
                )
            )
            while True:
                if session.closed:  # after `close`: wait (briefly) for the client to half-close
                    try:
                        item = await asyncio.wait_for(inbox.get(), CLOSE_LINGER_S)
                    except TimeoutError:
                        return
                else:
                    item = await inbox.get()
                if isinstance(item, DrainNotice):
                    if not session.closed:  # the token is current: every request read before it is answered
                        token, _ = self.tokens.encode(session.state())
                        yield pb.StreamResponse(
                            draining=pb.Draining(resume_token=token, deadline_unix_ms=item.deadline_ms)
                        )
                    continue
                if isinstance(item, SessionClosed) or (
                    # a request that waited behind the server's close: answer as its SessionClosed would
                    isinstance(item, pb.StreamRequest)
                    and session.close_reason in SERVER_CLOSES
                    and item.WhichOneof("kind") != "close"
                ):
                    reason = session.close_reason
                    for resp in self._server_closed(session):
                        yield resp
                    return
                if isinstance(item, _EndOfRequests):
                    if item.error is not None:
                        raise item.error
                    if not session.closed:
                        reason = "client"
                        self.sessions.close(session, reason)
                        yield _closed(session, reason, "client half-closed the stream")
                    return
                credit.release()
                kind = item.WhichOneof("kind")
                if kind == "step":
                    yield await self._step(session, item.step)
                elif kind == "close":
                    if session.closed:
                        raise FailedPrecondition(f"session {session.id} is already closed")
                    reason = "client"
                    self.sessions.close(session, reason)
                    yield _closed(session, reason, "closed by client")
                elif kind == "open":
                    raise FailedPrecondition(
                        f"this stream already has session {session.id}; open another stream for another session"
                    )
                elif kind == "snapshot":
                    token, expires = self.tokens.encode(session.state())  # FAILED_PRECONDITION once closed
                    yield pb.StreamResponse(
                        snapshot=pb.SnapshotTaken(token=token, steps=session.steps, expires_at_unix_ms=expires)
                    )
                else:
                    raise InvalidArgument("request has none of open, step, snapshot, close set")
        except CellserveError as e:
            reason = "error"
            self._count_error(e)
            await abort(context, e)
        finally:
            self.active_streams -= 1
            reader.cancel()
            if session is not None:
                self.sessions.close(session, reason)

    def _open(self, first: object, inbox: asyncio.Queue) -> Session:
        if isinstance(first, _EndOfRequests):
            if first.error is not None:
                raise first.error
            raise FailedPrecondition("stream ended before its first message; send open{model} first")
        assert isinstance(first, pb.StreamRequest)
        kind = first.WhichOneof("kind")
        if kind != "open":
            what = kind or "an empty request"
            raise FailedPrecondition(f"{what} before open: the first message of a stream must be open{{model}}")
        name = first.open.model or self.models.default_name()
        resume = None
        if first.open.resume_token:
            model = self.models.get(name)
            resume, _ = self.tokens.decode(first.open.resume_token, model=name, model_sha256=model.manifest.sha256)
        return self.sessions.open(
            name, idle_timeout_s=first.open.idle_timeout_s, resume=resume, notify=inbox.put_nowait
        )

    async def _step(self, session: Session, step: pb.Step) -> pb.StreamResponse:
        try:
            if not step.HasField("input"):
                raise InvalidArgument(f"step seq={step.seq} has no input tensor")
            y = await session.step(to_numpy(step.input))
        except STEP_ERRORS as e:
            self._count_error(e)
            code, message = to_status(e)
            return pb.StreamResponse(error=pb.StepError(seq=step.seq, code=code.value[0], message=message))
        if step.checkpoint:  # the state after this step, signed: the client's crash checkpoint
            token, _ = self.tokens.encode(session.state())
            return pb.StreamResponse(output=pb.Output(seq=step.seq, output=to_proto(y), resume_token=token))
        return pb.StreamResponse(output=pb.Output(seq=step.seq, output=to_proto(y)))

    def _server_closed(self, session: Session) -> list[pb.StreamResponse]:
        """``closed`` for a session the server ended; after a drain, preceded by a current token."""
        out = []
        if session.final_state is not None:  # kept only when a drain closed it
            token, _ = self.tokens.encode(session.final_state)
            out.append(pb.StreamResponse(draining=pb.Draining(resume_token=token, deadline_unix_ms=0)))
        out.append(_closed(session, session.close_reason, session.close_message))
        return out

    def _count_error(self, e: BaseException) -> None:
        self.metrics.errors.labels(code=to_status(e)[0].name).inc()

    # -- Generate ---------------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        from cellserve.model.sampling import Sampler

        session: Session | None = None
        try:
            model = self.models.get(request.model or self.models.default_name())
            _check_generate(request, model, self.settings.max_generate_tokens)
            sampler = Sampler(request.temperature, request.top_k, request.seed if request.HasField("seed") else None)
            session = self.sessions.open(model.name)
            tokens = np.frombuffer(request.prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [T]
            chunk = self.settings.max_chunk_steps
            for start in range(0, len(tokens), chunk):
                y = await session.step(tokens[start : start + chunk])  # [T, V]
            for i in range(request.max_tokens):
                token = sampler.next_token(y[-1])
                yield pb.GenerateResponse(token_ids=[token], text=bytes([token]))
                if i + 1 < request.max_tokens:
                    y = await session.step(np.array([token], dtype=np.int64))
        except CellserveError as e:
            self._count_error(e)
            await abort(context, e)
        finally:
            if session is not None:
                self.sessions.close(session, "client")

    # -- Models -----------------------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_summary(m) for m in self.models])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        try:
            model = self.models.get(request.model)
        except CellserveError as e:
            self._count_error(e)
            await abort(context, e)
        return pb.ModelInfoResponse(model=model_summary(model), manifest_json=model.manifest.to_json())


async def _pump(
    requests: AsyncIterator[pb.StreamRequest],
    inbox: asyncio.Queue,
    credit: asyncio.Semaphore,
) -> None:
    """Read requests into ``inbox``, at most READ_AHEAD ahead of the handler."""
    try:
        while True:
            await credit.acquire()
            try:
                request = await anext(requests)
            except StopAsyncIteration:
                inbox.put_nowait(_EndOfRequests())
                return
            inbox.put_nowait(request)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        inbox.put_nowait(_EndOfRequests(e))


def _closed(session: Session, reason: str, message: str) -> pb.StreamResponse:
    return pb.StreamResponse(
        closed=pb.Closed(steps=session.steps, reason=CLOSE_REASONS.get(reason, 0), message=message)
    )


def _check_generate(request: pb.GenerateRequest, model: LoadedModel, max_tokens: int) -> None:
    m = model.manifest
    if m.input_kind != "tokens":
        raise FailedPrecondition(f"model {m.name!r} takes features, not tokens; Generate needs a token model")
    if not request.prompt:
        raise InvalidArgument("prompt is empty; Generate needs at least one byte of prompt")
    if not 1 <= request.max_tokens <= max_tokens:
        raise InvalidArgument(f"max_tokens is {request.max_tokens}; it must be in [1, {max_tokens}]")
    if not (np.isfinite(request.temperature) and request.temperature >= 0):
        raise InvalidArgument(f"temperature is {request.temperature}; it must be a finite number >= 0")
    if request.top_k > m.output_size:
        raise InvalidArgument(f"top_k is {request.top_k}; model {m.name!r} has {m.output_size} tokens")


def model_summary(model: LoadedModel) -> pb.ModelSummary:
    m = model.manifest

    def spec(t: object) -> pb.TensorSpec:
        dims = [d if isinstance(d, int) else -1 for d in t.shape]  # type: ignore[attr-defined]
        return pb.TensorSpec(name=t.name, role=t.role, dtype=PB_DTYPES[t.dtype], shape=dims)  # type: ignore[attr-defined]

    return pb.ModelSummary(
        name=m.name,
        version=m.version,
        sha256=m.sha256,
        input_kind=m.input_kind,
        layers=m.layers,
        hidden=m.hidden,
        input_size=m.input_size,
        output_size=m.output_size,
        inputs=[spec(t) for t in m.inputs],
        outputs=[spec(t) for t in m.outputs],
    )
