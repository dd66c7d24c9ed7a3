"""Wire sizes of one cellserve step message and its reply (a Stream step, or a Multiplex step of many sessions),
so baselines carry the same bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cellserve.client.tensors import to_proto
from cellserve.v1 import cellserve_pb2 as pb

if TYPE_CHECKING:
    from cellserve.client.bench.load import LoadSpec
    from cellserve.client.model_info import ModelInfo


def message_sizes(spec: LoadSpec) -> tuple[int, int]:
    """(request bytes, reply bytes) of a cellserve Step/Output of ``spec``'s shape: x [T, *frame] in the model's
    dtype, y [T, *out] float32 (as cellserve serves every output)."""
    req = pb.StreamRequest(step=pb.Step(seq=1 << 20, input=to_proto(np.zeros(spec.step_shape(), spec.x_dtype))))
    y = np.zeros(spec.output_shape(), np.float32)
    reply = pb.StreamResponse(output=pb.Output(seq=1 << 20, output=to_proto(y)))
    return req.ByteSize(), reply.ByteSize()


def session_state_bytes(info: ModelInfo) -> int:
    """One session's state in bytes, every tensor, from the server's description of the model (its state inputs:
    the batch axis is the one dynamic dim)."""
    total = 0
    for t in info.inputs:
        if t.role.startswith("state"):
            total += int(np.prod([d for d in t.shape if d >= 0])) * np.dtype(t.dtype).itemsize
    return total


def multiplex_sizes(spec: LoadSpec) -> tuple[int, int]:
    """(request bytes, reply bytes) of a Multiplex step of ``spec.sessions`` sessions and its answer: x
    ``[K, T, *frame]`` with K handles, y ``[K, T, *out]`` float32 (the handles sized as a busy server's)."""
    k = spec.sessions
    handles = [1000 + i for i in range(k)]
    x = to_proto(np.zeros((k, *spec.step_shape()), spec.x_dtype))
    req = pb.MultiplexRequest(seq=1 << 20, step=pb.StepSessions(handles=handles, input=x))
    y = to_proto(np.zeros((k, *spec.output_shape()), np.float32))
    reply = pb.MultiplexResponse(seq=1 << 20, output=pb.SessionsOutput(output=y))
    return req.ByteSize(), reply.ByteSize()
