"""Baseline (a), the transport ceiling: a bare grpc.aio bidirectional echo server.

No protobuf, no model: generic handlers with identity (bytes) serializers. Each request's first four
bytes give the reply size, so replies match cellserve's output messages byte for byte in size.

Run: ``python -m cellserve.client.bench.baselines.echo --ready-file F`` (port 0; F gets {"port": P}).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from cellserve.client.bench.serving import serve_until_signal

SERVICE = "cellserve.bench.Echo"
METHOD = f"/{SERVICE}/Echo"


def echo_request(request_bytes: int, reply_bytes: int) -> bytes:
    """A request of ``request_bytes`` asking for a reply of ``reply_bytes``."""
    return struct.pack("<I", reply_bytes) + bytes(max(0, request_bytes - 4))


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    replies: dict[int, bytes] = {}
    async for req in requests:
        size = struct.unpack_from("<I", req)[0]
        reply = replies.get(size)
        if reply is None:
            reply = replies[size] = bytes(size)
        yield reply


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.stream_stream_rpc_method_handler(_echo)})


async def start(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


EchoOp = Callable[[], Awaitable[None]]


def echo_stream(channel: grpc.aio.Channel, request_bytes: int, reply_bytes: int) -> tuple[EchoOp, EchoOp, EchoOp]:
    """A client's echo stream on ``channel``: ``send`` writes one request of ``request_bytes``, ``receive`` reads
    one reply and checks it is ``reply_bytes`` long, ``close`` half-closes and drains the stream."""
    call = channel.stream_stream(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)()
    request = echo_request(request_bytes, reply_bytes)

    async def send() -> None:
        await call.write(request)

    async def receive() -> None:
        reply = await call.read()
        if not isinstance(reply, bytes) or len(reply) != reply_bytes:
            raise RuntimeError(f"echo replied {reply!r:.40}, expected {reply_bytes} bytes")

    async def close() -> None:
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    return send, receive, close


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args()
    asyncio.run(serve_until_signal(start(args.host, args.port), args.ready_file))


if __name__ == "__main__":
    main()
