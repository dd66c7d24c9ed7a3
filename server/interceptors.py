"""The request guard: request bytes that do not parse, or are over the size limit, get a precise status.

grpc's own answers would be UNKNOWN for bytes that do not parse and a RESOURCE_EXHAUSTED that names
no setting for an oversized message. The guard swaps every method's request deserializer for one
that returns a :class:`~cellserve.server.errors.BadRequest` marker instead of raising. Handlers
wrapped by :func:`~cellserve.server.errors.rpc` (ours) check the marker themselves, so nothing sits
on their per-message path; other services (health, reflection) get a thin wrapper that aborts.

gRPC's own receive limit is set above ``max_message_bytes`` (``grpc_receive_limit``) so that
requests just over the limit reach the guard and get a message naming the setting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cellserve.server.errors import BadRequest, CellserveError, InvalidArgument, ResourceExhausted, checked


class MalformedRequest(InvalidArgument):
    """A request's bytes did not parse as the method's message."""


class RequestTooLarge(ResourceExhausted):
    """A request is larger than the server's ``max_message_bytes``."""


def grpc_receive_limit(max_message_bytes: int) -> int:
    """The limit given to gRPC itself: room above ours, so the guard sees (and names) most oversized requests."""
    return max(2 * max_message_bytes, max_message_bytes + (4 << 20))


def guard_deserializer(parse: Callable[[bytes], Any], method: str, max_bytes: int) -> Callable[[bytes], Any]:
    """``parse``, returning a BadRequest instead of raising or accepting more than ``max_bytes``."""

    def parse_or_mark(data: bytes) -> Any:
        if len(data) > max_bytes:
            return BadRequest(
                RequestTooLarge(
                    f"request to {method} is {len(data)} bytes, over this server's limit of {max_bytes} "
                    "(setting max_message_bytes: --max-message-bytes / CELLSERVE_MAX_MESSAGE_BYTES); "
                    "send smaller chunks"
                )
            )
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError and anything a custom deserializer raises
            return BadRequest(MalformedRequest(f"request bytes are not a valid message for {method}: {e}"))

    return parse_or_mark


async def _reject(context: grpc.aio.ServicerContext, error: CellserveError, on_reject: Callable[[str], None]) -> None:
    on_reject(error.code.name)
    await context.abort(error.code, error.message)


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield checked(request)


class _CheckedContext:
    """A servicer context whose ``read()`` checks each request as ``_checked_stream`` does (for handlers
    that are not ours and read with ``context.read()``); everything else is the context's own."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def read(self) -> Any:
        return checked(await self._context.read())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses: those its async generator yields, or none from a handler that
    writes with ``context.write()`` (it is awaited)."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result


class RequestGuard(grpc.aio.ServerInterceptor):
    """Bad request bytes → INVALID_ARGUMENT, oversized ones → RESOURCE_EXHAUSTED naming the setting."""

    def __init__(self, max_bytes: int, on_reject: Callable[[str], None]) -> None:
        """``on_reject(code_name)`` counts a request refused here, for services that are not ours."""
        self.max_bytes = max_bytes
        self.on_reject = on_reject
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler, method)
        self._cache[method] = (handler, guarded)
        return guarded

    def _guard(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        safe = guard_deserializer(handler.request_deserializer, method, self.max_bytes)
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behaviour, "checks_requests", False):  # ours: the handler checks for BadRequest itself
            return handler._replace(request_deserializer=safe)
        on_reject = self.on_reject

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if type(request) is BadRequest:
                    await _reject(context, request.error, on_reject)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=safe, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if type(request) is BadRequest:
                    await _reject(context, request.error, on_reject)
                async for response in _responses(inner_us(request, context)):
                    yield response

            return handler._replace(request_deserializer=safe, unary_stream=unary_stream)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_su(_checked_stream(requests), _CheckedContext(context))
                except CellserveError as e:
                    await _reject(context, e, on_reject)

            return handler._replace(request_deserializer=safe, stream_unary=stream_unary)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in _responses(inner_ss(_checked_stream(requests), _CheckedContext(context))):
                    yield response
            except CellserveError as e:
                await _reject(context, e, on_reject)

        return handler._replace(request_deserializer=safe, stream_stream=stream_stream)
