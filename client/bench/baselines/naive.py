"""Baseline (b), what a user builds without cellserve: a stateless unary RPC.

The client keeps the session's state and sends it with every step; the server runs onnxruntime at
batch 1 and returns y and the next state. Wire format (raw little-endian, no protobuf):

- request = uint32 T, one uint32 per frame dim the model leaves dynamic (its size this step), x
  ([1, T, *frame] in x's dtype), then every state tensor in graph layout at batch 1, in manifest order,
  each in its own dtype;
- reply = y ([1, T, *out] float32, as cellserve serves it), then the next states in the same layout.

For our LSTM that is uint32 T, x, h [L, 1, H], c [L, 1, H] -> y, h', c', as it has always been. The
client carries the state as the bytes it got (``decode_reply``): it never needs to know the layout.

Run: ``python -m cellserve.client.bench.baselines.naive --model-dir D --ready-file F``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from cellserve.client.bench.baselines.onnx_model import OnnxModel
from cellserve.client.bench.serving import serve_until_signal

SERVICE = "cellserve.bench.Naive"
METHOD = f"/{SERVICE}/Step"


def dynamic_axes(frame: Sequence[int | None]) -> tuple[int, ...]:
    """Indices of ``frame``'s dynamic dims (None or -1): their sizes travel in a request's header."""
    return tuple(i for i, d in enumerate(frame) if d is None or d < 0)


def encode_request(x: np.ndarray, state: bytes, dynamic: Sequence[int] = ()) -> bytes:
    """One step of one session: ``x`` [1, T, *frame], the session's state as the last reply returned it (zeros
    at the start), ``dynamic`` the frame's dynamic dims (:func:`dynamic_axes`)."""
    dims = (x.shape[1], *(x.shape[2 + i] for i in dynamic))
    return struct.pack(f"<{len(dims)}I", *dims) + x.tobytes() + state


def decode_reply(reply: bytes, state_bytes: int) -> tuple[np.ndarray, bytes]:
    """(y flat as a float32 view of the reply, the next state's bytes to send with the next step)."""
    n = len(reply) - state_bytes
    return np.frombuffer(reply, dtype="<f4", count=n // 4), reply[n:]


class NaiveServicer:
    """Runs one session's step at batch 1 from the state the request carries."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.x_dtype = np.dtype(model.x_dtype).newbyteorder("<")
        self.dynamic = dynamic_axes(model.frame)
        self.header = struct.Struct(f"<{1 + len(self.dynamic)}I")
        self.states = [(np.dtype(s.dtype).newbyteorder("<"), s.graph_shape(1)) for s in model.states]

    def step(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        t, *sizes = self.header.unpack_from(request)
        frame = list(self.model.frame)
        for axis, size in zip(self.dynamic, sizes, strict=True):
            frame[axis] = size
        shape = (1, t, *frame)
        offset = self.header.size
        x = np.frombuffer(request, self.x_dtype, count=math.prod(shape), offset=offset).reshape(shape)
        offset += x.nbytes
        states = []
        for dtype, state_shape in self.states:
            state = np.frombuffer(request, dtype, count=math.prod(state_shape), offset=offset)
            states.append(state.reshape(state_shape))
            offset += state.nbytes
        if offset != len(request):
            raise ValueError(f"request has {len(request)} bytes; T={t} and the model's state take {offset}")
        y, next_states = self.model.run(x, states)
        return y.astype("<f4", copy=False).tobytes() + b"".join(s.tobytes() for s in next_states)


async def start(
    model_dir: Path, host: str = "127.0.0.1", port: int = 0, intra_op_threads: int = 1
) -> tuple[grpc.aio.Server, int]:
    servicer = NaiveServicer(OnnxModel.load(model_dir, intra_op_threads))
    # The ORT call runs on the event loop, one request at a time at batch 1: no batching, no state.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])

    async def step(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return servicer.step(request, context)

    handlers = {"Step": grpc.unary_unary_rpc_method_handler(step)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--intra-op-threads", type=int, default=1)
    args = p.parse_args()
    started = start(args.model_dir, args.host, args.port, args.intra_op_threads)
    asyncio.run(serve_until_signal(started, args.ready_file))


if __name__ == "__main__":
    main()
