"""One native ``Stream`` RPC: a session whose requests are read, answered and written by one coroutine.

The handler reads with ``context.read()`` and writes with ``context.write()`` — no reader task, no
inbox queue, no generator layers on the per-message path — and answers each request kind in its
own method. The session's server-side events (a drain notice; an idle or drain close) arrive
through :meth:`StreamHandler.notify`:

- while a request is being answered, an event waits until that answer is written, so a drain
  token always includes every step answered before it;
- while the handler waits for the next request, a drain notice is written by a short-lived task
  (the read stays pending), and a close interrupts the read (the stream then ends).

So the common case — steps and outputs, no events — costs no task per stream and no hop per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from typing import Final

import grpc

from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import (
    BadRequest,
    DeadlineExceeded,
    ErrorBoundary,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StepFailed,
)
from cellserve.server.logs import bind_log_fields
from cellserve.server.sessions import DrainNotice, Session, SessionClosed, SessionEvent
from cellserve.server.tensors import encode_output, to_numpy
from cellserve.v1 import cellserve_pb2 as pb

# After `closed`, the stream stays open this long for the client's half-close; a message sent on it
# in that time is answered FAILED_PRECONDITION (step after close), then the stream ends.
CLOSE_LINGER_S = 5.0
CLOSE_REASONS = {"client": pb.CLOSE_REASON_CLIENT, "idle": pb.CLOSE_REASON_IDLE, "drain": pb.CLOSE_REASON_DRAIN}
# Errors of a single step: answered in-stream, the session goes on.
STEP_ERRORS = (InvalidArgument, ResourceExhausted, StepFailed)

log = logging.getLogger(__name__)

EOF: Final = grpc.aio.EOF


class _Interrupted:
    """What :meth:`StreamHandler._read` returns when a server-side close cut the read short."""


INTERRUPTED: Final = _Interrupted()


class StreamHandler:
    """Serves one stream: opens its session from the first request, then answers requests in order.

    Its states, and what a server-side event does in each:

    ========== ================================== ===========================================
    state      handler is                         a drain notice / a close
    ========== ================================== ===========================================
    reading    awaiting ``context.read()``        written by ``_writer`` / read cancelled
               (``_reading``)                     (``_interrupted``), then the close is written
    answering  running one request's method        both wait in ``_events`` for its answer
    flushing   writing ``_events`` in order        (a close sets ``_done``: the stream ends)
    lingering  after a client close: awaiting      none come (the session is closed)
               the half-close
    ========== ================================== ===========================================
    """

    def __init__(
        self,
        plane: DataPlane,
        errors: ErrorBoundary,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.plane = plane
        self.errors = errors
        self.context = context
        self.session: Session | None = None
        self.reason = "disconnect"  # why the session ends, if nothing else says so
        self._task = asyncio.current_task()
        self._events: deque[SessionEvent] = deque()
        self._reading = False  # waiting in context.read(): no request is being answered
        self._interrupted = False  # we cancelled the read (a server-side close)
        self._writer: asyncio.Task[None] | None = None  # writes a drain notice while we read
        self._done = False
        self._stuck: asyncio.TimerHandle | None = None  # ends a stream whose closed session cannot be told

    async def run(self) -> None:
        try:
            session = self.session = self._open(await self._read_first())
            bind_log_fields(self.plane.log_fields(session))  # this handler's task: every line of it names the session
            await self._write(
                pb.StreamResponse(
                    opened=pb.Opened(
                        session_id=session.id,
                        model=session.model.name,
                        idle_timeout_s=session.idle_timeout_s,
                        steps=session.steps,
                        model_sha256=session.model.manifest.sha256,
                    )
                )
            )
            while not self._done:
                if self._events:
                    await self._flush_events()
                    continue
                request = await self._read()
                if request is INTERRUPTED or (session.closed and self._events):
                    continue  # the server closed the session: its events say how (a raced request is moot)
                if request is EOF:
                    await self._on_half_close(session)
                    return
                await self._answer(session, request)
        except grpc.aio.BaseError:
            raise  # the call itself broke under a read or write (client gone): a disconnect
        except Exception:  # a client's error, or the engine's: either way the session ended in an error
            if self.reason == "disconnect":
                self.reason = "error"
            raise
        finally:
            if self._writer is not None:
                self._writer.cancel()
            if self._stuck is not None:
                self._stuck.cancel()
            if self.session is not None:
                self.plane.close(self.session, self.reason)

    # -- requests ---------------------------------------------------------------------------------

    async def _read_first(self) -> object:
        return await first_request(self._read(), self.plane.settings.open_timeout_s, "an open{model}")

    def _open(self, first: object) -> Session:
        if first is EOF or first is INTERRUPTED:
            raise FailedPrecondition("stream ended before its first message; send open{model} first")
        assert isinstance(first, pb.StreamRequest)
        kind = first.WhichOneof("kind")
        if kind != "open":
            what = kind or "an empty request"
            raise FailedPrecondition(f"{what} before open: the first message of a stream must be open{{model}}")
        request = first.open
        return self.plane.open(
            request.model,
            idle_timeout_s=request.idle_timeout_s,
            resume_token=request.resume_token,
            notify=self.notify,
            trace_carrier=trace_carrier(self.context) if self.plane.tracing else None,
        )

    async def _answer(self, session: Session, request: pb.StreamRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind == "step":
            await self._on_step(session, request.step)
        elif kind == "snapshot":
            await self._on_snapshot(session)
        elif kind == "close":
            await self._on_close(session)
        elif kind == "open":
            raise FailedPrecondition(
                f"this stream already has session {session.id}; open another stream for another session"
            )
        else:
            raise InvalidArgument("request has none of open, step, snapshot, close set")

    async def _on_step(self, session: Session, step: pb.Step) -> None:
        try:
            if not step.HasField("input"):
                raise InvalidArgument(f"step seq={step.seq} has no input tensor")
            y = await self.plane.step(session, to_numpy(step.input))  # the scheduler's future: no coroutine per message
        except STEP_ERRORS as e:
            code, message = self.errors.status(e)
            await self._write(pb.StreamResponse(error=pb.StepError(seq=step.seq, code=code.value[0], message=message)))
            return
        # The state after this step, signed, when asked for: the client's crash checkpoint. A drain that
        # closed the session while the step ran sends that state as its final token right after.
        token = self.plane.snapshot(session).token if step.checkpoint and not session.closed else b""
        await self._write(encode_output(step.seq, y, token))

    async def _on_snapshot(self, session: Session) -> None:
        snap = self.plane.snapshot(session)
        await self._write(
            pb.StreamResponse(
                snapshot=pb.SnapshotTaken(token=snap.token, steps=snap.steps, expires_at_unix_ms=snap.expires_at_ms)
            )
        )

    async def _on_close(self, session: Session) -> None:
        self.reason = "client"
        self.plane.close(session, "client")
        await self._write(_closed(session, "client", "closed by client"))
        await self._linger(session)

    async def _on_half_close(self, session: Session) -> None:
        # EOF also ends the reads of a cancelled call: only a `closed` that could be written makes it the
        # client's close (else the session ends as a disconnect).
        await self._write(_closed(session, "client", "client half-closed the stream"))
        self.reason = "client"
        self.plane.close(session, "client")

    async def _linger(self, session: Session) -> None:
        """Wait briefly for the client's half-close; anything else sent on a closed session is an error."""
        try:
            request = await asyncio.wait_for(self.context.read(), CLOSE_LINGER_S)
        except TimeoutError:
            request = EOF
        self._done = True
        if request is not EOF:
            raise FailedPrecondition(f"session {session.id} is already closed; open a new stream for a new session")

    # -- server-side events -----------------------------------------------------------------------

    def notify(self, event: SessionEvent) -> None:
        """Called by the SessionManager (on the event loop) for a drain notice or a server-side close."""
        self._events.append(event)
        if isinstance(event, SessionClosed) and self._stuck is None:
            # A client that stopped reading keeps the handler in write(): the close cannot be written, so the
            # stream is given up after a short wait rather than holding its max_streams slot.
            self._stuck = asyncio.get_running_loop().call_later(CLOSE_LINGER_S, self._give_up)
        if not self._reading:
            return  # a request is being answered: the loop delivers the event right after its answer
        if isinstance(event, SessionClosed):
            self._interrupted = True  # the stream ends: the pending read may be given up
            if self._task is not None:
                self._task.cancel()
        elif self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_while_reading())

    def _give_up(self) -> None:
        """The session closed ``CLOSE_LINGER_S`` ago and the stream has not ended: its client is not reading."""
        if not self._done and self._task is not None and not self._task.done():
            log.info(
                "stream ended: its session closed and its client is not reading",
                extra={"session": self.session.id if self.session else "", "reason": self.reason},
            )
            self._task.cancel()

    async def _write_while_reading(self) -> None:
        """Write drain notices while the handler waits for a request (a close is left to the handler)."""
        try:
            session = self.session
            # Only while the handler waits in read(): then no step of this session is in flight (it reads
            # the next request only after answering the last), so the token includes every answered step.
            while self._reading and self._events and isinstance(self._events[0], DrainNotice):
                assert session is not None and not session.inflight
                await self._send_notice(session, self._events.popleft())  # type: ignore[arg-type]
        except Exception:  # the stream broke under the write: the handler's own read ends it
            log.debug("drain notice not delivered", exc_info=True)
        finally:
            self._writer = None

    async def _send_notice(self, session: Session, notice: DrainNotice) -> None:
        if not session.closed:  # the token is current: every request read before it is answered
            token = self.plane.snapshot(session).token
            await self._write_now(
                pb.StreamResponse(draining=pb.Draining(resume_token=token, deadline_unix_ms=notice.deadline_ms))
            )

    async def _flush_events(self) -> None:
        """Write the pending events in order; a close ends the stream."""
        await self._writer_done()
        session = self.session
        assert session is not None
        while self._events and not self._done:
            event = self._events.popleft()
            if isinstance(event, DrainNotice):
                await self._send_notice(session, event)
                continue
            self.reason = event.reason
            parting = self.plane.parting_snapshot(session)  # kept only when a drain closed it: the last token
            if parting is not None:
                await self._write_now(
                    pb.StreamResponse(draining=pb.Draining(resume_token=parting.token, deadline_unix_ms=0))
                )
            await self._write_now(_closed(session, event.reason, event.message))
            self._done = True

    # -- I/O --------------------------------------------------------------------------------------

    async def _read(self) -> object:
        """The next request, EOF, or INTERRUPTED (a server-side close cancelled the read)."""
        self._reading = True
        try:
            request = await self.context.read()
        except asyncio.CancelledError:
            if not self._interrupted or self._task is None:
                raise
            self._interrupted = False
            if self._task.uncancel() > 0:  # a real cancel (client gone, server stopping) came in too
                raise
            return INTERRUPTED
        finally:
            self._reading = False
        if type(request) is BadRequest:
            raise request.error
        return request

    async def _writer_done(self) -> None:
        if self._writer is not None:
            await asyncio.wait([self._writer])

    async def _write(self, response: pb.StreamResponse | bytes) -> None:
        if self._writer is not None:  # a drain notice is being written: ours goes after it
            await self._writer_done()
        await self.context.write(response)

    async def _write_now(self, response: pb.StreamResponse) -> None:
        """Write without waiting for the notice writer: only for the writer itself, and for the handler's
        ``_flush_events``, which waits for the writer before it writes."""
        await self.context.write(response)


def _closed(session: Session, reason: str, message: str) -> pb.StreamResponse:
    return pb.StreamResponse(
        closed=pb.Closed(steps=session.steps, reason=CLOSE_REASONS.get(reason, 0), message=message)
    )


def trace_carrier(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The caller's W3C trace context (``traceparent``, ``tracestate``) from its gRPC metadata."""
    return {
        key: value
        for key, value in context.invocation_metadata() or ()
        if key in ("traceparent", "tracestate") and isinstance(value, str)
    }


async def first_request(read: Awaitable[object], timeout: float, what: str) -> object:
    """A stream's first request (``read``), within ``open_timeout_s`` (``timeout``): a stream that never opens (or
    stalls inside its first message) must not hold a ``max_streams`` slot for the life of its connection."""
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        raise DeadlineExceeded(
            f"no {what} within {timeout:g} s of the stream's start (setting open_timeout_s); send it as the "
            "stream's first message"
        ) from None
