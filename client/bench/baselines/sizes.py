"""Wire sizes of one cellserve step message and its reply, so baselines carry the same bytes."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellserve.client.tensors import to_proto
from cellserve.v1 import cellserve_pb2 as pb


def message_sizes(spec: Any) -> tuple[int, int]:
    """(request bytes, reply bytes) of a cellserve Step/Output with ``spec.t`` steps."""
    tokens = spec.input_kind == "tokens"
    x = np.zeros((spec.t,) if tokens else (spec.t, spec.input_size), np.int64 if tokens else np.float32)
    req = pb.StreamRequest(step=pb.Step(seq=1 << 20, input=to_proto(x)))
    y = np.zeros((spec.t, spec.output_size), np.float32)
    reply = pb.StreamResponse(output=pb.Output(seq=1 << 20, output=to_proto(y)))
    return req.ByteSize(), reply.ByteSize()
