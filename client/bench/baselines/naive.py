"""Baseline (b), what a user builds without cellserve: a stateless unary RPC.

The client keeps h and c and sends x, h, c with every step; the server runs onnxruntime at batch 1
and returns y, h', c'. Wire format (raw little-endian, no protobuf): request = uint32 T, then x
([1, T] int64 or [1, T, I] float32), h [L, 1, H] float32, c [L, 1, H] float32; reply = y
[1, T, O] float32, h', c'.

Run: ``python -m cellserve.client.bench.baselines.naive --model-dir D --ready-file F``.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from pathlib import Path

import grpc
import numpy as np

from cellserve.client.bench.baselines.onnx_model import OnnxModel
from cellserve.client.bench.serving import serve_until_signal

SERVICE = "cellserve.bench.Naive"
METHOD = f"/{SERVICE}/Step"


def encode_request(x: np.ndarray, h: np.ndarray, c: np.ndarray) -> bytes:
    return struct.pack("<I", x.shape[1]) + x.tobytes() + h.tobytes() + c.tobytes()


def decode_reply(reply: bytes, state_floats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y flat, h flat, c flat) as float32 views of the reply."""
    a = np.frombuffer(reply, dtype="<f4")
    n = len(a) - 2 * state_floats
    return a[:n], a[n : n + state_floats], a[n + state_floats :]


class NaiveServicer:
    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.x_dtype = np.dtype("<i8") if model.input_kind == "tokens" else np.dtype("<f4")
        self.state_shape = (model.layers, 1, model.hidden)

    def step(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        m = self.model
        t = struct.unpack_from("<I", request)[0]
        width = 1 if m.input_kind == "tokens" else m.input_size
        x_bytes = t * width * self.x_dtype.itemsize
        x = np.frombuffer(request, self.x_dtype, count=t * width, offset=4)
        x = x.reshape((1, t) if m.input_kind == "tokens" else (1, t, width))
        state = np.frombuffer(request, "<f4", offset=4 + x_bytes).reshape(2, *self.state_shape)
        y, hn, cn = m.run(x, np.ascontiguousarray(state[0]), np.ascontiguousarray(state[1]))
        return y.tobytes() + hn.tobytes() + cn.tobytes()


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
