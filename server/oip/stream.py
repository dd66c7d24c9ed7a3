"""One OIP ``ModelStreamInfer`` RPC: Triton-style sequences over cellserve sessions, scoped to the stream.

A sequence id names a cellserve session while its stream lives: ``sequence_start`` opens the
session (zero state), each request steps it, ``sequence_end`` closes it and frees its slot. A step
for an id this stream has not started is an error (ids never reach across streams), and so is a
start for an id already running. The session's idle timeout ends a forgotten sequence.

The handler reads; each request is checked and submitted to the scheduler at once, or queued in
its sequence's lane behind the request of that id still in flight (in order within a sequence,
concurrent across sequences, so the scheduler batches them together). A step's response is built
in its completion callback and handed to the stream's one writer task. The handler stops reading
(gRPC flow control pushes back on the client) while ``STREAM_WINDOW`` requests are unanswered, or
while the answers owed exceed ``max_stream_buffer_bytes`` (each request is charged its answer's size,
known from its shape, when it is read): a client that does not read holds a bounded amount of memory.
A failed request is answered with ``error_message`` and the stream goes on.

A stream's first request must come within ``open_timeout_s``; a stream with no sequence and nothing
owed that stays silent for ``idle_timeout_s`` ends, as an idle session would. At most
``max_sessions_per_stream`` sequences run on one stream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
import numpy as np

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import (
    BadRequest,
    DeadlineExceeded,
    ErrorBoundary,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from cellserve.server.models import LoadedModel
from cellserve.server.oip.inputs import answer_bytes
from cellserve.server.oip.sequences import SequenceFlags, SequenceKey, sequence_flags
from cellserve.server.oip.tensors import infer_response, parameters
from cellserve.server.sessions import Session, SessionClosed, SessionEvent
from cellserve.server.stream import first_request, trace_carrier

log = logging.getLogger(__name__)

# Requests of one stream being worked on or waiting to be sent back; past it the server stops reading.
STREAM_WINDOW = 256
BAD_REQUEST = object()  # what a request the guard refused is answered as (it was never charged)

Response = oip.ModelStreamInferResponse
# (request) -> (model, the outputs to return, x [1, T] or [1, T, I]): the servicer's checks of a request
Prepare = Callable[[oip.ModelInferRequest], tuple[LoadedModel, list[str], np.ndarray]]
Stateless = Callable[[oip.ModelInferRequest], Awaitable[oip.ModelInferResponse]]


class Gauge(Protocol):
    """A gauge the stream moves (``cellserve_streams_paused``)."""

    def inc(self) -> None: ...
    def dec(self) -> None: ...


class OipStream:
    """Serves one ModelStreamInfer stream."""

    def __init__(
        self,
        plane: DataPlane,
        errors: ErrorBoundary,
        context: grpc.aio.ServicerContext,
        prepare: Prepare,
        stateless: Stateless,
        paused: Gauge,
    ) -> None:
        """``prepare`` checks a sequence request; ``stateless`` answers a request outside any sequence; ``paused``
        counts the streams whose reading is paused for a client that does not read its answers."""
        self.plane = plane
        self.errors = errors
        self.context = context
        self._prepare, self._stateless = prepare, stateless
        self._live: dict[SequenceKey, Session] = {}  # the sequences this stream has started
        self._lanes: dict[SequenceKey, deque[tuple[oip.ModelInferRequest, SequenceFlags]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # stateless requests in the stream
        self._out: asyncio.Queue[tuple[Response, bool, int] | None] = asyncio.Queue()  # (response, answers, bytes)
        self._unanswered = 0
        self._owed_bytes = 0  # the answers of the unanswered requests, by their charges
        self._charges: dict[int, int] = {}  # id(request) -> its charge, until it is answered
        settings = self._settings = plane.settings
        self._buffer_bytes = settings.max_stream_buffer_bytes
        self._max_message = settings.max_message_bytes
        self._max_sequences = settings.max_sessions_per_stream
        self._paused = paused
        self._task = asyncio.current_task()
        self._last_active = time.monotonic()  # the last request read or answer written
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idled_out = False
        self._progress: asyncio.Future[None] | None = None  # the reader waits for answers on it
        self._writer: asyncio.Task[None] | None = None
        self._ended = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = self._writer = loop.create_task(self._write_responses())
        self._idle_timer = loop.call_later(self._settings.idle_timeout_s, self._check_idle)
        try:
            first = True
            while True:
                if self._unanswered >= STREAM_WINDOW:
                    await self._answers(lambda: self._unanswered < STREAM_WINDOW)
                if self._owed_bytes >= self._buffer_bytes:
                    await self._catch_up()
                request = await (self._read_first() if first else self._read())
                first = False
                if request is grpc.aio.EOF:
                    break
                self._unanswered += 1
                charge = self._charge(request)
                if charge:
                    self._owed_bytes += charge
                    self._charges[id(request)] = charge
                self._on_request(request)
            await self._answers(lambda: self._unanswered == 0)  # half-closed: answer what was sent, then end
            self._out.put_nowait(None)
            await writer
        finally:
            self._ended = True
            self._idle_timer.cancel()
            writer.cancel()
            for task in self._tasks:
                task.cancel()
            for key, session in list(self._live.items()):
                self._end(key, session, "disconnect")

    # -- reading ----------------------------------------------------------------------------------

    async def _read_first(self) -> Any:
        return await first_request(self.context.read(), self._settings.open_timeout_s, "ModelInferRequest")

    async def _read(self) -> Any:
        """The next request; DEADLINE_EXCEEDED once the stream has idled out (see ``_check_idle``)."""
        try:
            request = await self.context.read()
        except asyncio.CancelledError:
            task = self._task
            if not self._idled_out or task is None or task.uncancel() > 0:  # a real cancel came in too
                raise
            timeout = self._settings.idle_timeout_s
            raise DeadlineExceeded(
                f"stream idle for {timeout} s with no sequence running (setting idle_timeout_s); open a new stream "
                "to start another"
            ) from None
        self._last_active = time.monotonic()
        return request

    def _check_idle(self) -> None:
        """A timer: a stream with no sequence and nothing owed, silent for ``idle_timeout_s``, is ended (as an idle
        session would be), so it gives its ``max_streams`` slot back. One timer per stream, re-armed as it fires."""
        timeout = self._settings.idle_timeout_s
        now = time.monotonic()
        busy = self._live or self._unanswered
        due = now + timeout if busy else self._last_active + timeout
        if due > now:
            self._idle_timer = asyncio.get_running_loop().call_later(due - now, self._check_idle)
            return
        self._idled_out = True
        if self._task is not None:
            self._task.cancel()

    async def _catch_up(self) -> None:
        """Stop reading until the answers owed fit ``max_stream_buffer_bytes`` again (counted as paused)."""
        self._paused.inc()
        try:
            await self._answers(lambda: self._owed_bytes < self._buffer_bytes)
        finally:
            self._paused.dec()

    def _charge(self, request: Any) -> int:
        """The size of ``request``'s answer, from its shape (y and the state it may return); at most one message,
        0 for a request no model can answer (its error answer is small)."""
        if type(request) is BadRequest:
            return 0
        try:
            manifest = self.plane.model(request.model_name).manifest
        except Exception:
            return 0
        for tensor in request.inputs:
            if tensor.name == manifest.input.name and tensor.shape:
                rows = tensor.shape[0]
                steps = tensor.shape[1] if manifest.input.time_axis and len(tensor.shape) > 1 else 1
                if rows <= 0 or steps <= 0:
                    return 0
                return min(answer_bytes(manifest, rows, steps), self._max_message)
        return 0

    # -- requests ---------------------------------------------------------------------------------

    def _on_request(self, request: Any) -> None:
        if type(request) is BadRequest:
            self._fail(None, request.error)
            return
        try:
            flags = sequence_flags(parameters(request.parameters))
        except Exception as e:
            self._fail(request, e)
            return
        if flags is None:  # stateless, as ModelInfer
            task = asyncio.get_running_loop().create_task(self._stateless_one(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        lane = self._lanes.get(flags.key)
        if lane is not None:  # a request of this sequence is in flight: this one runs after it
            lane.append((request, flags))
            return
        self._lanes[flags.key] = deque([(request, flags)])
        self._advance(flags.key)

    async def _stateless_one(self, request: oip.ModelInferRequest) -> None:
        try:
            response = Response(infer_response=await self._stateless(request))
        except Exception as e:
            self._fail(request, e)
            return
        self._send(response, answers=request)

    def _advance(self, key: SequenceKey) -> None:
        """Start the next waiting request of sequence ``key``; its lane ends when none waits."""
        lane = self._lanes[key]
        while lane and not self._ended:
            request, flags = lane.popleft()
            if self._start_step(request, flags):
                return  # in flight: its completion advances the lane again
        del self._lanes[key]

    def _start_step(self, request: oip.ModelInferRequest, flags: SequenceFlags) -> bool:
        """Check one sequence request and submit its step; False if it was answered at once (an error)."""
        opened: Session | None = None
        try:
            model, outputs, x = self._prepare(request)
            session = self._live.get(flags.key)
            if session is not None and session.closed:  # ended by the server (idle, drain) since
                del self._live[flags.key]
                session = None
            if flags.start:
                if session is not None:
                    raise FailedPrecondition(
                        f"sequence {flags.label} is already active on this stream; end it (sequence_end) before "
                        "starting it again"
                    )
                if len(self._live) >= self._max_sequences:
                    raise ResourceExhausted(
                        f"this stream has {len(self._live)} sequences running (setting max_sessions_per_stream); "
                        "end one (sequence_end) before starting another, or use another stream"
                    )
                # Check the input before opening, so a bad first request leaves no sequence behind.
                model.check_input(x[0])
                notify = functools.partial(self._server_event, flags)
                carrier = trace_carrier(self.context) if self.plane.tracing else None
                session = opened = self._live[flags.key] = self.plane.open(
                    model.name, notify=notify, trace_carrier=carrier
                )
            elif session is None:
                raise FailedPrecondition(
                    f"inference request for sequence {flags.label} to model '{model.name}' must specify the START "
                    f"flag on the first request of the sequence (no sequence {flags.label} is active on this "
                    "stream; sequence ids are scoped to the stream that started them)"
                )
            elif session.model is not model:
                raise InvalidArgument(
                    f"sequence {flags.label} runs on model '{session.model.name}', not '{model.name}'"
                )
            future = self.plane.step(session, x[0])
        except Exception as e:
            if opened is not None:  # a failed start leaves no sequence
                self._end(flags.key, opened, "error")
            elif flags.end and (live := self._live.get(flags.key)) is not None:
                self._end(flags.key, live, "error")  # nor a failed end: its client counts the sequence as over
            self._fail(request, e)
            return False
        future.add_done_callback(functools.partial(self._step_done, request, flags, session, model, outputs))
        return True

    def _step_done(
        self,
        request: oip.ModelInferRequest,
        flags: SequenceFlags,
        session: Session,
        model: LoadedModel,
        outputs: list[str],
        future: asyncio.Future[np.ndarray],
    ) -> None:
        try:
            y = future.result()  # [T, *out]
            m = model.manifest
            tensors = {m.output.name: y[None] if m.input.time_axis else y}  # [1, T, *out], or one frame [1, *out]
            if len(outputs) > 1 or outputs[0] != m.output.name:  # next states asked for by name
                # a drain that closed the session while this step ran kept the state after it
                state = self.plane.state(session)
                tensors.update((spec.output, value[None]) for spec, value in zip(m.states, state.states, strict=True))
            response = Response(infer_response=infer_response(request, m.name, m.version, outputs, tensors))
        except BaseException as e:  # CancelledError too: every request read gets exactly one answer
            if flags.start or flags.end:  # a failed start or end leaves no sequence
                self._end(flags.key, session, "error")
            self._fail(request, e)
        else:
            if flags.end:
                self._end(flags.key, session, "client")
            self._send(response, answers=request)
        if not self._ended:
            self._advance(flags.key)

    def _end(self, key: SequenceKey, session: Session, reason: str) -> None:
        if self._live.get(key) is session:
            del self._live[key]
        self.plane.close(session, reason)

    def _server_event(self, flags: SequenceFlags, event: SessionEvent) -> None:
        if not isinstance(event, SessionClosed):
            # A drain notice: the Triton protocol cannot hand state over, so an OIP sequence keeps
            # running until it ends or the grace period closes it (then it hears SessionClosed).
            return
        session = self._live.get(flags.key)
        if session is not None and session.closed:
            del self._live[flags.key]
        text = f"sequence {flags.label} was ended by the server: {event.message}"
        self._send(Response(error_message=text), answers=None)

    # -- responses --------------------------------------------------------------------------------

    def _fail(self, request: oip.ModelInferRequest | None, error: BaseException) -> None:
        """Answer one request with its error (counted); the stream and its other sequences go on."""
        _, message = self.errors.status(error)
        failed = oip.ModelInferResponse(model_name=request.model_name, id=request.id) if request else None
        answered = request if request is not None else BAD_REQUEST
        self._send(Response(error_message=message, infer_response=failed), answers=answered)

    def _send(self, response: Response, *, answers: Any) -> None:
        """Queue ``response`` for the writer; ``answers``: the request it answers (None for a notice)."""
        if not self._ended:
            charge = self._charges.pop(id(answers), 0) if answers is not None else 0
            self._out.put_nowait((response, answers is not None, charge))

    async def _write_responses(self) -> None:
        try:
            while (item := await self._out.get()) is not None:
                response, answers, charge = item
                await self.context.write(response)
                self._last_active = time.monotonic()
                if answers:
                    self._unanswered -= 1
                    self._owed_bytes -= charge
                    self._wake_reader()
        finally:
            self._wake_reader()  # also when a write failed: the reader must not wait for answers that never come

    def _wake_reader(self) -> None:
        if self._progress is not None and not self._progress.done():
            self._progress.set_result(None)

    async def _answers(self, enough: Callable[[], bool]) -> None:
        """Wait until ``enough()`` (checked each time the writer sends an answer); re-raises a writer failure."""
        loop = asyncio.get_running_loop()
        writer = self._writer
        assert writer is not None
        while not enough():
            if writer.done():
                await writer  # raises what broke it
                return
            self._progress = loop.create_future()
            await self._progress
