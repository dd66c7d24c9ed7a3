"""Who may talk to the server: TLS (optionally mutual) from files, and bearer tokens.

Both are re-read when their files change, so a rotated certificate or token list takes effect
without a restart: certificates at the next new connection's handshake, tokens within a second.
A file that does not parse keeps the previous contents in force (and logs a warning); secrets are
never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

MESSAGE = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
# Probes and discovery stay open: health checks (kubelet, load balancers), server reflection, and the
# Open Inference Protocol's liveness/readiness (what KServe/Triton-style probes call).
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    *(
        f"/{svc}/{m}"
        for svc in ("inference.GRPCInferenceService", "cellserve.oip.GRPCInferenceService")
        for m in ("ServerLive", "ServerReady")
    ),
)
TOKEN_RECHECK_S = 1.0


def _stamp(paths: Iterable[Path | None]) -> tuple[tuple[int, int], ...]:
    """(mtime_ns, size) of each file: cheap to take, changes when a file is rewritten or replaced."""
    out = []
    for p in paths:
        if p is not None:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


# -- TLS -------------------------------------------------------------------------------------------


class CertificateFiles:
    """Server certificate, key and optional client CA (mutual TLS), re-read when the files change.

    gRPC asks ``fetch`` at every new connection's handshake; it answers ``None`` (keep the current
    configuration) unless the files changed and the new certificate and key match.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths())
        try:
            self._initial = self._read()  # fail fast on a bad pair at start
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ValueError(
                f"TLS: cannot use certificate {cert_file} with key {key_file}"
                + (f" and client CA {client_ca_file}" if client_ca_file else "")
                + f": {e} (PEM files expected; the key must match the certificate)"
            ) from e

    def _paths(self) -> tuple[Path | None, ...]:
        return (self.cert_file, self.key_file, self.client_ca_file)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        if self.client_ca_file is not None:
            ssl.create_default_context(cafile=self.client_ca_file)  # parses, or raises
        pair = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake (on a gRPC thread)."""
        with self._lock:
            try:
                stamp = _stamp(self._paths())
                if stamp == self._stamp:
                    return None
                self._stamp = stamp  # a bad new file is tried once, not at every handshake
                config = self._read()
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning("TLS files changed but cannot be used; keeping the previous ones", extra={"error": str(e)})
                return None
            self.reloads += 1
            log.info("TLS certificate reloaded", extra={"cert_file": str(self.cert_file), "reloads": self.reloads})
            return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self.client_ca_file is not None
        )


# -- bearer tokens ---------------------------------------------------------------------------------


def parse_tokens(raw: str) -> list[str]:
    """Accepted tokens from a comma-separated string or a JSON list; blanks dropped."""
    text = raw.strip()
    items = json.loads(text) if text.startswith("[") else text.split(",")
    return [str(t).strip() for t in items if str(t).strip()]


def _file_tokens(path: Path) -> list[str]:
    """One or more tokens per line (comma-separated or a JSON list); ``#`` lines are comments."""
    tokens: list[str] = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            tokens.extend(parse_tokens(line))
    return tokens


class AcceptedTokens:
    """The tokens from the secret setting plus the tokens file; the file is re-read when it changes."""

    def __init__(self, secret: str | None, path: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._fixed = parse_tokens(secret) if secret else []
        self._path = path
        self._clock = clock
        self._stamp = _stamp([path])
        self._checked = clock()
        self._tokens = self._merge(_file_tokens(path) if path is not None else [])
        if not self._tokens:
            raise ValueError("bearer auth is configured but no token was given (auth_tokens / auth_tokens_file)")

    def _merge(self, from_file: list[str]) -> tuple[bytes, ...]:
        return tuple(t.encode() for t in [*self._fixed, *from_file])

    def current(self) -> tuple[bytes, ...]:
        if self._path is not None and self._clock() - self._checked >= TOKEN_RECHECK_S:
            self._checked = self._clock()
            self._reload(self._path)
        return self._tokens

    def _reload(self, path: Path) -> None:
        try:
            stamp = _stamp([path])
            if stamp == self._stamp:
                return
            self._stamp = stamp
            from_file = _file_tokens(path)
        except (OSError, ValueError) as e:
            log.warning("tokens file changed but cannot be read; keeping the previous tokens", extra={"error": str(e)})
            return
        if not from_file:
            log.warning("tokens file is now empty; keeping the previous tokens", extra={"file": str(path)})
            return
        self._tokens = self._merge(from_file)
        log.info("bearer tokens reloaded", extra={"file": str(path), "count": len(self._tokens)})

    def accepts(self, given: bytes) -> bool:
        # compare against every token so the time taken does not tell which one (if any) matched
        hits = [hmac.compare_digest(given, t) for t in self.current()]
        return any(hits)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Rejects calls without an accepted ``authorization: Bearer <token>``; probes stay open."""

    def __init__(self, tokens: AcceptedTokens, on_deny: Callable[[], None] = lambda: None) -> None:
        self._tokens = tokens
        self._on_deny = on_deny

    def _accepted(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return scheme.lower() == "bearer" and self._tokens.accepts(token.strip().encode())
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method or ""
        if method.startswith(OPEN_PREFIXES) or self._accepted(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        self._on_deny()
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that aborts UNAUTHENTICATED without parsing the request."""

    async def abort(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)
