"""Who may talk to the server: TLS credentials from files and a bearer-token interceptor.

Not yet wired into ``CellServer.start()`` (see /work/notes/issue-8b.md). Certificates are read
once, at start: a changed cert/key takes effect on restart.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

MESSAGE = "missing or invalid bearer token in the 'authorization' metadata"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def parse_tokens(raw: str) -> list[str]:
    """Accepted tokens from a comma-separated string or a JSON list; blanks dropped."""
    text = raw.strip()
    items = json.loads(text) if text.startswith("[") else text.split(",")
    return [str(t).strip() for t in items if str(t).strip()]


def load_tokens(secret: str | None, path: Path | None) -> list[str]:
    """Tokens from the secret setting and the tokens file (one per line or comma/JSON), merged."""
    tokens = parse_tokens(secret) if secret else []
    if path is not None:
        for line in path.read_text().splitlines():
            tokens.extend(parse_tokens(line))
    return tokens


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; a client CA file turns on mutual TLS (client cert required)."""
    pair = (key_file.read_bytes(), cert_file.read_bytes())
    ca = client_ca_file.read_bytes() if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


class BearerAuth(grpc.aio.ServerInterceptor):
    """Rejects calls without an accepted ``authorization: Bearer <token>``; probes stay open."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise ValueError("BearerAuth needs at least one token")

    def _accepted(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer":
                return False
            given = token.strip().encode()
            # compare against every token so timing does not tell which one matched
            hits = [hmac.compare_digest(given, t) for t in self._tokens]
            return any(hits)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method or ""
        if method.startswith(OPEN_PREFIXES) or self._accepted(details.invocation_metadata):
            return await continuation(details)
        return _deny(await continuation(details))


def _deny(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    if handler is None:
        return None

    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)
