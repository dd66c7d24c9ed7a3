"""Builders for tests that speak the native Stream API over a raw grpc.aio channel: request messages,
reading a stream to its end, and one whole oracle-checked session."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import numpy as np

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

TOL = 1e-5


async def read_rest(call: Any) -> list[pb.StreamResponse]:
    """Read until the stream ends (status in ``call.code()``), using read() so it mixes with writes."""
    out = []
    try:
        while (r := await call.read()) is not grpc.aio.EOF:
            out.append(r)
    except grpc.aio.AioRpcError:
        pass  # the stream ended with a non-OK status; callers check call.code()
    return out


def oip_sequence_request(
    sid: int, steps: int = 1, *, start: bool = False, end: bool = False, model: str = "tiny"
) -> oip.ModelInferRequest:
    """An OIP ``ModelStreamInfer`` request of sequence ``sid``: ``steps`` token ids (7) as x ``[1, steps]``."""
    req = oip.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="INT64", shape=[1, steps]).contents.int64_contents.extend([7] * steps)
    req.parameters["sequence_id"].int64_param = sid
    if start:
        req.parameters["sequence_start"].bool_param = True
    if end:
        req.parameters["sequence_end"].bool_param = True
    return req


def step_msg(seq: int, x: np.ndarray) -> pb.StreamRequest:
    return pb.StreamRequest(step=pb.Step(seq=seq, input=to_proto(x)))


def open_msg(model: str = "tiny", **kw: Any) -> pb.StreamRequest:
    return pb.StreamRequest(open=pb.Open(model=model, **kw))


async def run_session(
    address: str, tokens: np.ndarray, chunks: list[int], rng: random.Random, opened_all: asyncio.Barrier | None = None
) -> np.ndarray:
    """One session: send ``tokens`` in ``chunks``, yielding to other sessions at random; returns y.
    With ``opened_all``, its first step waits until every session of the barrier has opened."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.CellServeStub(channel).Stream()
        await call.write(open_msg())
        opened = await call.read()
        assert opened.WhichOneof("kind") == "opened"
        if opened_all is not None:
            await opened_all.wait()
        outputs, start = [], 0
        for seq, n in enumerate(chunks):
            await call.write(step_msg(seq, tokens[start : start + n]))
            start += n
            resp = await call.read()
            assert resp.WhichOneof("kind") == "output", resp
            assert resp.output.seq == seq
            outputs.append(to_numpy(resp.output.output))
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)  # shuffle the interleaving between sessions
        await call.write(pb.StreamRequest(close=pb.Close()))
        closed = await call.read()
        assert closed.WhichOneof("kind") == "closed" and closed.closed.steps == len(tokens)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return np.concatenate(outputs)
