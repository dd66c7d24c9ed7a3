"""The sync ``Gateway`` shared by threads, against a scripted ``Multiplex`` call whose step answers wait until the
test lets them go: a call from another thread waits for the one in progress (the core is one record, not safe to
run from two threads at once)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from cellserve.client.gateway import Gateway
from cellserve.client.gateway_core import GatewayCore
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import SessionPolicy
from cellserve.client.tensors import to_numpy, to_proto
from cellserve.v1 import cellserve_pb2 as pb

INFO = ModelInfo("toy", "1", "7" * 64, "tokens", 1, 4, 256, 1)
WAIT_S = 10.0


class HeldServer:
    """``start`` for a ``Gateway``: each call reads requests as the client writes them (``arrived``), answers opens
    and closes at once, and each step (zeros, [N, T, 1]) only once ``release`` is set, in request order."""

    def __init__(self) -> None:
        self.arrived: queue.Queue[pb.MultiplexRequest] = queue.Queue()
        self.release = threading.Event()

    def __call__(self, target: str, requests: Iterator[pb.MultiplexRequest], **kwargs: Any) -> _Call:
        return _Call(self, requests)


class _Call:
    def __init__(self, server: HeldServer, requests: Iterator[pb.MultiplexRequest]) -> None:
        self._server = server
        self._answers: queue.Queue[pb.MultiplexResponse | None] = queue.Queue()
        self._out: queue.Queue[pb.MultiplexResponse | None] = queue.Queue()
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()
        threading.Thread(target=self._answer, daemon=True).start()

    def __iter__(self) -> Iterator[pb.MultiplexResponse]:
        while (resp := self._out.get()) is not None:
            yield resp

    def cancel(self) -> None:
        self._out.put(None)

    def _read(self, requests: Iterator[pb.MultiplexRequest]) -> None:
        handles = 0
        for req in requests:
            self._server.arrived.put(req)
            kind = req.WhichOneof("kind")
            if kind == "open":
                opened = []
                for want in req.open.sessions:
                    handles += 1
                    opened.append(pb.OpenedSession(handle=handles, key=want.key, session_id=f"s{handles}", model="toy"))
                self._answers.put(pb.MultiplexResponse(seq=req.seq, opened=pb.SessionsOpened(sessions=opened)))
            elif kind == "step":
                y = np.zeros((*to_numpy(req.step.input).shape, 1), np.float32)  # [N, T, 1]
                self._answers.put(pb.MultiplexResponse(seq=req.seq, output=pb.SessionsOutput(output=to_proto(y))))
            else:
                closed = pb.SessionsClosed(handles=req.close.handles, reason=pb.CLOSE_REASON_CLIENT)
                self._answers.put(pb.MultiplexResponse(seq=req.seq, closed=closed))
        self._answers.put(None)  # the client half-closed: the call ends after its answers

    def _answer(self) -> None:
        while (resp := self._answers.get()) is not None:
            if resp.WhichOneof("kind") == "output":
                self._server.release.wait(WAIT_S)
            self._out.put(resp)
        self._out.put(None)


def _steps(server: HeldServer, timeout_s: float) -> list[pb.MultiplexRequest]:
    """The step requests that reach the server within ``timeout_s``."""
    steps = []
    try:
        while True:
            req = server.arrived.get(timeout=timeout_s)
            if req.WhichOneof("kind") == "step":
                steps.append(req)
                timeout_s = 0.05
    except queue.Empty:
        return steps


def test_calls_from_another_thread_wait_for_the_call_in_progress():
    server = HeldServer()
    core = GatewayCore(("t0:1",), SessionPolicy(checkpoint_every=0), model="toy")
    results: dict[str, np.ndarray] = {}
    with Gateway(core, server, lambda model, target: INFO, ()) as gw:
        gw.open(["a", "b"])
        first = threading.Thread(target=lambda: results.update(gw.step({"a": [1]})))
        first.start()
        assert len(_steps(server, WAIT_S)) == 1  # a's step is on the server, its answer held
        second = threading.Thread(target=lambda: results.update(gw.step({"b": [2, 3]})))
        second.start()
        assert _steps(server, 0.5) == []  # b's call waits its turn: nothing of it is sent meanwhile
        server.release.set()
        first.join(WAIT_S)
        second.join(WAIT_S)
        assert not first.is_alive() and not second.is_alive()
        assert len(_steps(server, WAIT_S)) == 1  # b's, once a's call was done
    assert results["a"].shape == (1, 1) and results["b"].shape == (2, 1)
