"""The request guard on services that are not ours (health, reflection, any added later): bad request
bytes get INVALID_ARGUMENT and oversized ones RESOURCE_EXHAUSTED naming the setting, whether the
handler yields its responses or reads and writes through its context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from cellserve.server.interceptors import RequestGuard
from cellserve.v1 import cellserve_pb2 as pb

SERVICE = "test.Guarded"
MAX_BYTES = 64
GOOD = pb.Close().SerializeToString()  # b"": any message of the type parses
BAD = b"\xff\xff\xff"  # not a protobuf message at all
BIG = pb.StreamRequest(open=pb.Open(model="x" * 2 * MAX_BYTES)).SerializeToString()


async def _yielding(requests: AsyncIterator[pb.Close], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield b"ok"


async def _read_write(requests: AsyncIterator[pb.Close], context: grpc.aio.ServicerContext) -> None:
    while (request := await context.read()) is not grpc.aio.EOF:
        assert isinstance(request, pb.Close), request  # never the guard's marker
        await context.write(b"ok")


async def _call(method: str, frames: list[bytes]) -> tuple[list[bytes], grpc.StatusCode, str]:
    rejected: list[str] = []
    server = grpc.aio.server(interceptors=[RequestGuard(MAX_BYTES, rejected.append)])
    handlers = {
        name: grpc.stream_stream_rpc_method_handler(
            behaviour, request_deserializer=pb.Close.FromString, response_serializer=lambda b: b
        )
        for name, behaviour in (("Yielding", _yielding), ("ReadWrite", _read_write))
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)()  # fmt: skip
            replies = []
            try:
                for frame in frames:
                    await call.write(frame)
                    replies.append(await call.read())
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
            except grpc.aio.AioRpcError:  # the server ended the call: its status says why
                pass
            return replies, await call.code(), await call.details()
    finally:
        await server.stop(None)


@pytest.mark.parametrize("method", ["Yielding", "ReadWrite"])
def test_good_requests_pass_and_a_bad_one_ends_the_call_with_a_precise_status(method):
    replies, code, _ = asyncio.run(_call(method, [GOOD, GOOD]))
    assert (replies, code) == ([b"ok", b"ok"], grpc.StatusCode.OK)

    replies, code, details = asyncio.run(_call(method, [GOOD, BAD, GOOD]))
    assert replies == [b"ok"] and code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"request bytes are not a valid message for /{SERVICE}/{method}")

    replies, code, details = asyncio.run(_call(method, [BIG]))
    assert replies == [] and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over this server's limit of {MAX_BYTES}" in details and "max_message_bytes" in details
