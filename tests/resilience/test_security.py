"""Bearer-token interceptor on a real grpc.aio server (loopback, port 0)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cellserve.server.security import MESSAGE, BearerAuth, parse_tokens

ECHO = "/test.Echo/Echo"


async def _call(addr: str, token: str | None) -> bytes:
    md = (("authorization", f"Bearer {token}"),) if token is not None else None
    async with grpc.aio.insecure_channel(addr) as ch:
        return await ch.unary_unary(ECHO)(b"hi", metadata=md, timeout=5)


def test_bearer_tokens_gate_calls_but_not_health() -> None:
    async def main() -> None:
        server = grpc.aio.server(interceptors=[BearerAuth(parse_tokens("old, new"))])
        echo = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Echo": echo})])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        addr = f"127.0.0.1:{port}"
        try:
            assert await _call(addr, "old") == b"hi"
            assert await _call(addr, "new") == b"hi"
            for bad in (None, "wrong", ""):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _call(addr, bad)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert err.value.details() == MESSAGE
            async with grpc.aio.insecure_channel(addr) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)

    asyncio.run(main())
