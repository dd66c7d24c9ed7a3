"""A raw Multiplex stream for tests: requests built from numpy, answers read back in order (no SDK)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_numpy, to_proto


class Gateway:
    """One Multiplex call on ``channel``; each method writes one request and returns its answer."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.call = pb_grpc.CellServeStub(channel).Multiplex(metadata=metadata or None)
        self.seq = 0
        self.events: list[pb.MultiplexResponse] = []  # server events (seq 0) read while waiting for an answer

    async def request(self, **kind: Any) -> pb.MultiplexResponse:
        self.seq += 1
        await self.call.write(pb.MultiplexRequest(seq=self.seq, **kind))
        return await self.answer(self.seq)

    async def answer(self, seq: int) -> pb.MultiplexResponse:
        while True:
            response = await self.call.read()
            assert response is not grpc.aio.EOF, "stream ended before the answer"
            if response.seq == 0:
                self.events.append(response)
                continue
            assert response.seq == seq, f"answer {response.seq} came before {seq}'s"
            return response

    async def open(self, n: int, model: str = "tiny", **kw: Any) -> list[int]:
        """Open ``n`` sessions (keys "k0".."k{n-1}"); their handles, asserting every open succeeded."""
        answer = await self.request(
            open=pb.OpenSessions(sessions=[pb.SessionOpen(model=model, key=f"k{i}", **kw) for i in range(n)])
        )
        assert not answer.errors, answer.errors
        assert [s.key for s in answer.opened.sessions] == [f"k{i}" for i in range(n)]
        return [s.handle for s in answer.opened.sessions]

    async def step(self, handles: list[int], x: np.ndarray, checkpoint: bool = False) -> pb.MultiplexResponse:
        return await self.request(step=pb.StepSessions(handles=handles, input=to_proto(x), checkpoint=checkpoint))

    async def event(self) -> pb.MultiplexResponse:
        """The next server event (seq 0), one already read first."""
        if self.events:
            return self.events.pop(0)
        response = await self.call.read()
        assert response is not grpc.aio.EOF and response.seq == 0, response
        return response


def output(answer: pb.MultiplexResponse) -> np.ndarray:
    return to_numpy(answer.output.output)
