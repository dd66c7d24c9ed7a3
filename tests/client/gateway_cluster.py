"""A scripted cluster of toy Multiplex servers that performs a gateway core's operations without I/O (for
test_gateway_core.py): each toy server's output for a session's step is the step's position in the session, so a
lost, repeated or misplaced step shows in the outputs themselves."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellserve.client.errors import (
    UnavailableError,
)
from cellserve.client.gateway_core import GatewayCore
from cellserve.client.gateway_errors import GatewayError
from cellserve.client.gateway_ops import Describe, EndLane, PollOn, ReceiveOn, SendOn, StartLane
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import Ended, Pause, SessionPolicy
from cellserve.client.tensors import to_numpy, to_proto
from cellserve.v1 import cellserve_pb2 as pb

SHA = "7" * 64
INFO = ModelInfo("toy", "1", SHA, "tokens", 1, 4, 256, 1)
FORBIDDEN = 255  # a token id the toy server refuses (the client's check lets it through)


@dataclass
class ToyStream:
    target: int
    alive: bool = True
    sessions: dict[int, int] = field(default_factory=dict)  # handle -> steps
    responses: deque = field(default_factory=deque)
    next_handle: int = 1


class Cluster:
    """Toy servers t0, t1, ... that can be killed, restarted, drained, or made to refuse some tokens."""

    def __init__(self, n: int = 2) -> None:
        self.targets = tuple(f"t{i}:1" for i in range(n))
        self.up = [True] * n
        self.refuse_tokens: set[bytes] = set()  # tokens every target refuses (an expired one, say)
        self.streams: dict[int, ToyStream] = {}
        self.rows: list[tuple[int, bool]] = []  # (target, checkpoint) of every step row a live server ran
        self.on_send: Callable[[pb.MultiplexRequest], None] | None = None
        self.now = 0.0

    def core(self, **options: Any) -> GatewayCore:
        policy = SessionPolicy(**{k: options.pop(k) for k in list(options) if k in SessionPolicy.__dataclass_fields__})
        return GatewayCore(self.targets, policy, model="toy", clock=lambda: self.now, **options)

    def run(self, routine: Any) -> Any:
        reply = None
        try:
            while True:
                reply = self.perform(routine.send(reply))
        except StopIteration as done:
            return done.value

    def outcome(self, routine: Any) -> tuple[Any, dict]:
        """A call's result and its failed keys' errors (a GatewayError's)."""
        try:
            return self.run(routine), {}
        except GatewayError as e:
            return e.result, e.errors

    def perform(self, op: Any) -> Any:
        if isinstance(op, StartLane):
            index = self.targets.index(op.target)
            self.streams[op.lane] = ToyStream(index, alive=self.up[index])
        elif isinstance(op, SendOn):
            s = self.streams[op.lane]
            if s.alive:
                s.responses.append(self._answer(s, op.request))
            if self.on_send is not None:
                self.on_send(op.request)
        elif isinstance(op, (ReceiveOn, PollOn)):
            s = self.streams[op.lane]
            if s.responses:
                return s.responses.popleft()
            if not s.alive:
                return Ended(UnavailableError("Socket closed"))
            assert isinstance(op, PollOn), "the core waits for an answer that never comes"
        elif isinstance(op, EndLane):
            self.streams[op.lane].alive = False
            self.streams[op.lane].responses.clear()
        elif isinstance(op, Describe):
            return INFO
        elif isinstance(op, Pause):
            self.now += op.seconds
        return None

    def kill(self, target: int) -> None:
        """SIGKILL: every stream on it ends, its unsent answers lost."""
        self.up[target] = False
        for s in self.streams.values():
            if s.target == target:
                s.alive = False
                s.responses.clear()

    def push(self, target: int, event: Callable[[ToyStream], pb.MultiplexResponse]) -> None:
        for s in self.streams.values():
            if s.target == target and s.alive:
                s.responses.append(event(s))

    def _answer(self, s: ToyStream, req: pb.MultiplexRequest) -> pb.MultiplexResponse:
        kind = req.WhichOneof("kind")
        if kind == "open":
            opened, errors = [], []
            for i, want in enumerate(req.open.sessions):
                if want.resume_token in self.refuse_tokens:
                    errors.append(pb.EntryError(index=i, code=3, message="token refused"))
                    opened.append(pb.OpenedSession(key=want.key))
                    continue
                handle, s.next_handle = s.next_handle, s.next_handle + 1
                steps = int(want.resume_token.decode()) if want.resume_token else 0
                s.sessions[handle] = steps
                opened.append(pb.OpenedSession(handle=handle, key=want.key, session_id=f"s{handle}", model="toy",
                                               steps=steps, model_sha256=SHA))  # fmt: skip
            return pb.MultiplexResponse(seq=req.seq, opened=pb.SessionsOpened(sessions=opened), errors=errors)
        if kind == "step":
            x = to_numpy(req.step.input)  # [N, T]
            y = np.zeros((len(x), x.shape[1], 1), np.float32)
            tokens, errors = [], []
            for i, handle in enumerate(req.step.handles):
                steps = s.sessions.get(handle)
                if steps is None or (x[i] == FORBIDDEN).any():
                    code = 9 if steps is None else 3
                    errors.append(pb.EntryError(index=i, code=code, message=f"row {i} refused"))
                    tokens.append(b"")
                    continue
                y[i, :, 0] = np.arange(steps, steps + x.shape[1])
                s.sessions[handle] = steps + x.shape[1]
                tokens.append(str(s.sessions[handle]).encode())
                self.rows.append((s.target, req.step.checkpoint))
            out = pb.SessionsOutput(output=to_proto(y), resume_tokens=tokens if req.step.checkpoint else [])
            return pb.MultiplexResponse(seq=req.seq, output=out, errors=errors)
        if kind == "snapshot":
            tokens = [str(s.sessions[h]).encode() for h in req.snapshot.handles]
            steps = [s.sessions[h] for h in req.snapshot.handles]
            return pb.MultiplexResponse(seq=req.seq, snapshot=pb.SessionsSnapshot(tokens=tokens, steps=steps))
        for h in req.close.handles:
            s.sessions.pop(h, None)
        return pb.MultiplexResponse(seq=req.seq, closed=pb.SessionsClosed(handles=req.close.handles))
