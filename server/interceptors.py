"""Server interceptors that apply to every service on the port.

``MalformedMessages``: a request whose bytes do not parse as the method's message is answered
INVALID_ARGUMENT (grpc's own answer would be UNKNOWN). Deserializers are wrapped so a parse
failure becomes a marker value, and the handler is wrapped so the marker aborts the call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cellserve.server.errors import InvalidArgument


class MalformedRequest(InvalidArgument):
    """A streamed request's bytes did not parse; raised out of the request iterator."""


class _Malformed:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError and anything a custom deserializer raises
            return _Malformed(str(e))

    return parse


def _message(method: str, bad: _Malformed) -> str:
    return f"request bytes are not a valid message for {method}: {bad.error}"


async def _reject(context: grpc.aio.ServicerContext, method: str, bad: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, bad))


class MalformedMessages(grpc.aio.ServerInterceptor):
    """Unparseable request bytes → INVALID_ARGUMENT, for unary and streaming methods alike."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        safe = _safe(handler.request_deserializer)

        async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Malformed):  # the handler maps it, or the wrappers below abort
                    raise MalformedRequest(_message(method, request))
                yield request

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await _reject(context, method, request)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=safe, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await _reject(context, method, request)
                result = inner_us(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a handler that writes with context.write()
                    await result

            return handler._replace(request_deserializer=safe, unary_stream=unary_stream)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_su(guarded(requests, context), context)
                except MalformedRequest as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)

            return handler._replace(request_deserializer=safe, stream_unary=stream_unary)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in inner_ss(guarded(requests, context), context):
                    yield response
            except MalformedRequest as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)

        return handler._replace(request_deserializer=safe, stream_stream=stream_stream)
