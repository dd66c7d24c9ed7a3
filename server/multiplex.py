"""One ``Multiplex`` RPC: a gateway's stream of many sessions, stepped many per message in columnar form.

Like :class:`~cellserve.server.stream.StreamHandler`, one coroutine reads a request, answers it and writes the
answer before it reads the next, so answers come back in request order and a session's steps are applied in the
order they were sent. Everything a session does goes through the
:class:`~cellserve.server.dataplane.DataPlane`: a step message is one :meth:`DataPlane.step_many` call, one
scheduler entry for all its rows, no future or protobuf object per row.

Server-side events (a drain notice, an idle or drain close) arrive per session through ``notify``. They are
written between answers, all those pending in one message per kind: one ``draining`` with every session's token,
one ``closed`` per close reason. While the handler waits for a request (no step of this stream is in flight, so
every token is current) a short-lived task writes them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable

import grpc

from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import (
    BadRequest,
    CellserveError,
    ErrorBoundary,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from cellserve.server.models import RESPONSE_OVERHEAD, LoadedModel
from cellserve.server.sessions import DrainNotice, Session, SessionClosed, SessionEvent
from cellserve.server.stream import CLOSE_LINGER_S, CLOSE_REASONS, first_request, trace_carrier
from cellserve.server.tensors import encode_sessions_output, to_numpy
from cellserve.v1 import cellserve_pb2 as pb

log = logging.getLogger(__name__)

EOF = grpc.aio.EOF


class MultiplexHandler:
    """Serves one Multiplex stream: its sessions by handle, its requests in order, its sessions' events."""

    def __init__(self, plane: DataPlane, errors: ErrorBoundary, context: grpc.aio.ServicerContext) -> None:
        self.plane = plane
        self.errors = errors
        self.context = context
        self.sessions: dict[int, Session] = {}  # handle -> open session
        self._closing: dict[int, Session] = {}  # handle -> session the server closed, its close not yet written
        self._next_handle = 1
        self._max_sessions = plane.settings.max_sessions_per_stream
        self._events: deque[tuple[int, SessionEvent]] = deque()
        self._reading = False
        self._writer: asyncio.Task[None] | None = None  # writes events while the handler waits for a request
        self._stuck: asyncio.TimerHandle | None = None  # ends a stream whose client stopped reading
        self._task = asyncio.current_task()
        self.reason = "disconnect"  # how the stream's sessions end, if nothing else says so

    async def run(self) -> None:
        try:
            request = await self._read_first()
            while request is not EOF:
                assert isinstance(request, pb.MultiplexRequest)
                await self._answer(request)
                if self._events:
                    await self._write_events()
                request = await self._read()
            self.reason = "client"  # half-closed: the client is done with every session
        except grpc.aio.BaseError:
            raise
        except Exception:
            self.reason = "error"
            raise
        finally:
            for handle in (self._writer, self._stuck):
                if handle is not None:
                    handle.cancel()
            for session in self.sessions.values():
                self.plane.close(session, self.reason)

    # -- requests ---------------------------------------------------------------------------------

    async def _answer(self, request: pb.MultiplexRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind is None:  # broken protocol: the stream ends
            raise InvalidArgument("request has none of open, step, snapshot, close set")
        try:
            if kind == "step":
                response = await self._step(request)
            elif kind == "open":
                response = self._open(request)
            elif kind == "snapshot":
                response = self._snapshot(request)
            else:
                response = self._close(request)
        except CellserveError as e:  # the whole request failed; nothing of it was applied, the stream goes on
            code, message = self.errors.status(e)
            response = pb.MultiplexResponse(
                seq=request.seq, error=pb.StepError(seq=request.seq, code=code.value[0], message=message)
            )
        await self.context.write(response)  # no event writer runs now: _read waited for it, none starts unless reading

    def _open(self, request: pb.MultiplexRequest) -> pb.MultiplexResponse:
        wanted = request.open.sessions
        if not wanted:
            raise InvalidArgument("open lists no sessions; give one SessionOpen{model, key} per session")
        carrier = trace_carrier(self.context) if self.plane.tracing else None
        opened: list[pb.OpenedSession] = []
        errors: list[pb.EntryError] = []
        for i, want in enumerate(wanted):
            try:
                if len(self.sessions) >= self._max_sessions:
                    raise ResourceExhausted(
                        f"this stream holds {len(self.sessions)} sessions (setting max_sessions_per_stream); open "
                        "more on another stream"
                    )
                handle = self._next_handle
                session = self.plane.open(
                    want.model,
                    idle_timeout_s=want.idle_timeout_s,
                    resume_token=want.resume_token,
                    notify=self._notifier(handle),
                    trace_carrier=carrier,
                )
            except CellserveError as e:
                errors.append(self._entry_error(i, e))
                opened.append(pb.OpenedSession(key=want.key))
                continue
            self._next_handle += 1
            self.sessions[handle] = session
            opened.append(
                pb.OpenedSession(
                    handle=handle,
                    key=want.key,
                    session_id=session.id,
                    model=session.model.name,
                    idle_timeout_s=session.idle_timeout_s,
                    steps=session.steps,
                    model_sha256=session.model.manifest.sha256,
                )
            )
        return pb.MultiplexResponse(seq=request.seq, opened=pb.SessionsOpened(sessions=opened), errors=errors)

    async def _step(self, request: pb.MultiplexRequest) -> pb.MultiplexResponse | bytes:
        step = request.step
        handles = step.handles
        if not handles:
            raise InvalidArgument("step names no handles; give one handle per row of input")
        if not step.HasField("input"):
            raise InvalidArgument(f"step seq={request.seq} has no input tensor")
        x = to_numpy(step.input)
        if x.ndim < 2 or x.shape[0] != len(handles):
            raise InvalidArgument(
                f"input has shape {list(x.shape)} for {len(handles)} handles; send [N, T, *frame] with N = the "
                "number of handles (row i steps handles[i])"
            )
        sessions = [self.sessions.get(h) for h in handles]
        unknown: dict[int, Exception] = {}
        if None in sessions:
            unknown = {
                i: FailedPrecondition(f"handle {h} names no open session on this stream (never opened, or closed)")
                for i, (h, s) in enumerate(zip(handles, sessions, strict=True))
                if s is None
            }
        model = next((s.model for s in sessions if s is not None), None)
        if model is not None:
            self._check_reply_size(model, len(handles), x.shape[1], step.checkpoint)
        result = await self.plane.step_many(sessions, x, unknown)
        errors = result.errors
        y = result.y
        if y is None:  # every entry failed: zero rows of the model's output shape
            frame = model.manifest.output.frame if model is not None else ()
            shape = [len(handles), x.shape[1], *(d or 0 for d in frame)]
            output = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, raw=bytes(4 * math.prod(shape)))
        else:
            output = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=y.shape, raw=y.astype("<f4", copy=False).tobytes())
        if not errors and not step.checkpoint and y is not None:  # the common answer: its bytes, built directly
            return encode_sessions_output(request.seq, y)
        tokens: list[bytes] = []
        if step.checkpoint:
            tokens = [
                b"" if i in errors or s is None or s.closed else self.plane.snapshot(s).token
                for i, s in enumerate(sessions)
            ]
        return pb.MultiplexResponse(
            seq=request.seq,
            output=pb.SessionsOutput(output=output, resume_tokens=tokens),
            errors=[self._entry_error(i, e) for i, e in sorted(errors.items())],
        )

    def _check_reply_size(self, model: LoadedModel, n: int, t: int, checkpoint: bool) -> None:
        """INVALID_ARGUMENT, with the numbers, when the answer could not be sent within max_message_bytes."""
        manifest = model.manifest
        row = model.output_step_bytes
        tokens = n * (manifest.state_bytes + RESPONSE_OVERHEAD) if checkpoint else 0
        reply, limit = n * t * row + tokens + RESPONSE_OVERHEAD, self.plane.settings.max_message_bytes
        if reply > limit:
            raise InvalidArgument(
                f"the answer would be about {reply} bytes ({n} sessions x T={t} x {row} bytes of output"
                f"{' + their resume tokens' if checkpoint else ''}), over max_message_bytes ({limit}); "
                "send fewer sessions or steps per message"
            )

    def _snapshot(self, request: pb.MultiplexRequest) -> pb.MultiplexResponse:
        tokens: list[bytes] = []
        steps: list[int] = []
        errors: list[pb.EntryError] = []
        expires = 0
        for i, handle in enumerate(request.snapshot.handles):
            try:
                snap = self.plane.snapshot(self._session(handle))
            except CellserveError as e:
                errors.append(self._entry_error(i, e))
                tokens.append(b"")
                steps.append(0)
                continue
            tokens.append(snap.token)
            steps.append(snap.steps)
            expires = snap.expires_at_ms
        snapshot = pb.SessionsSnapshot(tokens=tokens, steps=steps, expires_at_unix_ms=expires)
        return pb.MultiplexResponse(seq=request.seq, snapshot=snapshot, errors=errors)

    def _close(self, request: pb.MultiplexRequest) -> pb.MultiplexResponse:
        closed = pb.SessionsClosed(reason=pb.CLOSE_REASON_CLIENT, message="closed by client")
        errors: list[pb.EntryError] = []
        for i, handle in enumerate(request.close.handles):
            try:
                session = self._session(handle)
            except CellserveError as e:
                errors.append(self._entry_error(i, e))
                continue
            del self.sessions[handle]
            self.plane.close(session, "client")
            closed.handles.append(handle)
            closed.steps.append(session.steps)
        return pb.MultiplexResponse(seq=request.seq, closed=closed, errors=errors)

    def _session(self, handle: int) -> Session:
        session = self.sessions.get(handle)
        if session is None:
            raise FailedPrecondition(f"handle {handle} names no open session on this stream (never opened, or closed)")
        return session

    def _entry_error(self, index: int, error: Exception) -> pb.EntryError:
        code, message = self.errors.status(error)
        return pb.EntryError(index=index, code=code.value[0], message=message)

    # -- server-side events -----------------------------------------------------------------------

    def _notifier(self, handle: int) -> Callable[[SessionEvent], None]:
        return lambda event: self._notify(handle, event)

    def _notify(self, handle: int, event: SessionEvent) -> None:
        """Called by the SessionManager (on the event loop) for one session's drain notice or server-side close."""
        self._events.append((handle, event))
        if isinstance(event, SessionClosed):
            session = self.sessions.pop(handle, None)  # its handle names nothing from now on
            if session is not None:
                self._closing[handle] = session
            if not self.sessions and self._stuck is None:  # nothing left to serve: a client that is not reading
                self._stuck = asyncio.get_running_loop().call_later(CLOSE_LINGER_S, self._give_up)
        if self._reading and self._writer is None:  # else the handler writes them right after its answer
            self._writer = asyncio.get_running_loop().create_task(self._write_while_reading())

    def _give_up(self) -> None:
        """Every session closed ``CLOSE_LINGER_S`` ago and their close is still unwritten: the client is not reading."""
        self._stuck = None
        if self._task is not None and not self._task.done():
            log.info("multiplex stream ended: its sessions closed and its client is not reading")
            self._task.cancel()

    async def _write_while_reading(self) -> None:
        try:
            await self._write_events()
        except Exception:  # the stream broke under the write: the handler's own read ends it
            log.debug("session events not delivered", exc_info=True)
        finally:
            self._writer = None

    async def _write_events(self) -> None:
        """Write the pending events: drain notices as one ``draining`` (every session's current token), closes as
        one ``closed`` per reason (after a ``draining`` with the final tokens of those a drain closed)."""
        while self._events:
            notices: list[int] = []
            deadline = 0
            closes: dict[tuple[str, str], list[int]] = {}
            while self._events:
                handle, event = self._events.popleft()
                if isinstance(event, DrainNotice):
                    notices.append(handle)
                    deadline = event.deadline_ms
                else:
                    closes.setdefault((event.reason, event.message), []).append(handle)
            open_now = [(h, self.sessions[h]) for h in notices if h in self.sessions]
            if open_now:
                tokens = [self.plane.snapshot(s).token for _, s in open_now]
                await self.context.write(
                    pb.MultiplexResponse(
                        draining=pb.SessionsDraining(
                            handles=[h for h, _ in open_now], resume_tokens=tokens, deadline_unix_ms=deadline
                        )
                    )
                )
            for (reason, message), handles in closes.items():
                await self._write_closes(reason, message, [h for h in handles if h in self._closing])
        if self._stuck is not None:
            self._stuck.cancel()
            self._stuck = None

    async def _write_closes(self, reason: str, message: str, handles: list[int]) -> None:
        if not handles:
            return
        sessions = [self._closing.pop(h) for h in handles]
        parting = [(h, self.plane.parting_snapshot(s)) for h, s in zip(handles, sessions, strict=True)]
        kept = [(h, p.token) for h, p in parting if p is not None]
        if kept:  # a drain closed them: their final state, as the token to resume from elsewhere
            await self.context.write(
                pb.MultiplexResponse(
                    draining=pb.SessionsDraining(handles=[h for h, _ in kept], resume_tokens=[t for _, t in kept])
                )
            )
        closed = pb.SessionsClosed(
            handles=handles, steps=[s.steps for s in sessions], reason=CLOSE_REASONS.get(reason, 0), message=message
        )
        await self.context.write(pb.MultiplexResponse(closed=closed))

    # -- I/O --------------------------------------------------------------------------------------

    async def _read_first(self) -> object:
        return await first_request(self._read(), self.plane.settings.open_timeout_s, "request (open{sessions})")

    async def _read(self) -> object:
        self._reading = True
        try:
            if self._events and self._writer is None:  # events that came in while the last answer was written
                self._writer = asyncio.get_running_loop().create_task(self._write_while_reading())
            request = await self.context.read()
        finally:
            self._reading = False
        if self._writer is not None:  # events being written: ours go after them
            await asyncio.wait([self._writer])
        if type(request) is BadRequest:
            raise request.error
        return request
