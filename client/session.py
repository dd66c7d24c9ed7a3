"""Synchronous session: one bidirectional stream, one step in flight, closed by its context manager."""

from __future__ import annotations

import queue
from collections.abc import Callable
from types import TracebackType

import grpc
import numpy as np

from cellserve.client.errors import (
    CellserveClientError,
    DataLossError,
    UnavailableError,
    from_rpc_error,
)
from cellserve.client.model_info import ModelInfo
from cellserve.client.protocol import ResumeAttempt, SessionState
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

_END = object()  # half-closes the request stream


class Session:
    """A stateful session. ``y = s.step(x)``: x is [T] token ids (or one id) / [T, I] features; y is [T, O].

    Use it as a context manager: leaving the block (also by an exception) sends ``close`` and
    half-closes the stream, so the server frees the session's state slot at once.
    """

    def __init__(
        self,
        stub: pb_grpc.CellServeStub,
        state: SessionState,
        info_for: Callable[[str], ModelInfo],
        *,
        model: str = "",
        idle_timeout_s: int = 0,
        resume_token: bytes = b"",
        metadata: tuple[tuple[str, str], ...] = (),
        connect: Callable[[str], pb_grpc.CellServeStub] | None = None,
        target: int = 0,
    ) -> None:
        self.state = state
        self._metadata = metadata
        self._connect = connect  # stub for another target: enables transparent resume on drain
        self._target = target  # index in state.targets of the server holding the session
        self._lost: CellserveClientError | None = None  # why a failed move ended the session
        self._open_on(stub, model, idle_timeout_s, resume_token)
        try:
            self.info = info_for(state.model)
        except BaseException:
            self._abandon()
            raise

    def _open_on(self, stub: pb_grpc.CellServeStub, model: str, idle_timeout_s: int, token: bytes) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self._ended = False
        self._failed = False  # the stream ended with an error status: nothing left to close
        self._requests.put(self.state.open_request(model, idle_timeout_s, token))
        self._call = stub.Stream(iter(self._requests.get, _END), metadata=self._metadata)
        try:
            self.state.on_opened(self._next())
        except BaseException:
            self._abandon()
            raise

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def steps(self) -> int:
        """Steps this session has taken (including those before a resume)."""
        return self.state.steps

    def step(self, x: object) -> np.ndarray:
        """Run one chunk of T >= 1 steps; returns [T, O] float32. StepRejected leaves the session usable."""
        if self._lost is not None:
            raise self._lost
        a = self.info.check_input(x)
        req = self.state.step_request(a)
        seq = req.step.seq
        self._requests.put(req)
        while True:
            try:
                resp = self._next()
            except UnavailableError:
                if not self._can_resume():
                    raise
                self._resume_elsewhere(self.state.resume_token)  # the token predates this step:
                self._requests.put(req)  # send it again from the token's state
                continue
            out = self.state.on_response(resp)  # raises StepRejected for this step
            if out is not None:
                if out.seq != seq:
                    raise UnavailableError(f"server answered seq {out.seq} while seq {seq} was expected")
                if self.state.draining and self._can_resume():
                    self._move()
                return out.y
            if self.state.closed_reason is not None:
                if self.state.closed_reason == "drain" and self._can_resume():
                    self._resume_elsewhere(self.state.resume_token)
                    self._requests.put(req)
                    continue
                self._half_close()
                raise self.state.closed_error()

    def snapshot(self) -> bytes:
        """Ask for a resume token of the current state (servers without resume answer UNIMPLEMENTED)."""
        self._requests.put(self.state.snapshot_request())
        while True:
            resp = self._next()
            self.state.on_response(resp)
            if resp.WhichOneof("kind") == "snapshot":
                return resp.snapshot.token
            if self.state.closed_reason is not None:
                raise self.state.closed_error()

    def close(self) -> None:
        """Send ``close``, wait for ``closed``, half-close. Idempotent."""
        if self._ended:
            return
        try:
            if self.state.closed_reason is None and not self._failed:
                self._requests.put(self.state.close_request())
                while self.state.closed_reason is None:
                    try:
                        resp = self._next()
                    except UnavailableError:
                        break
                    if resp.WhichOneof("kind") != "error":
                        self.state.on_response(resp)
        finally:
            self._half_close()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # leaving on an exception: still close politely, but never mask the original error
            self.close()
        except CellserveClientError:
            self._abandon()

    # -- transparent resume -----------------------------------------------------------------------

    def _can_resume(self) -> bool:
        return self._connect is not None and bool(self.state.resume_token) and len(self.state.targets) > 1

    def _move(self) -> None:
        """The server is draining: take an exact token, open on another target, then leave this one.

        If no other target takes the session it stays here (served until the grace period ends) and
        the next step tries again.
        """
        try:
            token = self.snapshot()
        except CellserveClientError:  # the grace ended first (closed, or the server stopped)
            self._failed = True
            try:  # the draining token is what is left; it is current unless a step was answered after it
                self._resume_elsewhere(self.state.resume_token)
            except (UnavailableError, DataLossError) as e:
                self._lost = e  # this step's output is still good: the next step reports the loss
            return
        here = (self._requests, self._call, self.state.session_id, self._target)
        try:
            self._resume_elsewhere(token, leave_current=False)
        except (UnavailableError, DataLossError):  # nobody took it: stay here
            self._requests, self._call, self.state.session_id, self._target = here
            self._ended = self._failed = False
            self.state.closed_reason, self.state.draining = None, True
            return
        old_requests, old_call = here[0], here[1]
        old_requests.put(self.state.close_request())
        old_requests.put(_END)
        try:
            for _ in old_call:  # `closed`, then the stream ends: the old slot is free
                pass
        except grpc.RpcError:
            pass

    def _resume_elsewhere(self, token: bytes, *, leave_current: bool = True) -> None:
        """Open the session on the other targets in turn with ``token``; UnavailableError if none takes it."""
        assert self._connect is not None
        if leave_current:
            self._half_close()
        attempt = ResumeAttempt(self.state, self._target)
        for index in attempt.candidates():
            try:
                self._open_on(
                    self._connect(self.state.targets[index]), self.state.model, self.state.idle_timeout_s, token
                )
            except CellserveClientError as e:
                attempt.failed(index, e)
                continue
            self._target = index
            if (stale := attempt.stale(index)) is not None:
                self.close()
                raise stale
            return
        raise attempt.give_up()

    # -- internals --------------------------------------------------------------------------------

    def _next(self) -> pb.StreamResponse:
        try:
            return next(self._call)
        except StopIteration:
            self._failed = True
            self._half_close()
            raise UnavailableError("the server ended the stream without closing the session") from None
        except grpc.RpcError as e:
            self._failed = True
            self._half_close()
            raise from_rpc_error(e) from None

    def _half_close(self) -> None:
        if not self._ended:
            self._ended = True
            self._requests.put(_END)

    def _abandon(self) -> None:
        self._half_close()
        self._call.cancel()
