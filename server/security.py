"""Who may talk to the server: TLS (optionally mutual) from files, and bearer tokens.

Both are re-read when their files change, so a rotated certificate or token list takes effect
without a restart. A ``FileWatcher`` thread does every read (about once a second); the handshake
callback and the auth interceptor only take what it prepared, so a slow or stuck mount never
stalls connections or the event loop. A certificate file that does not parse keeps the previous
pair in force (with a warning); secrets are never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import stat
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

MESSAGE = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
# Only probes stay open: grpc.health.v1 Check (kubelet, load balancers, `cellserve health`) and the
# Open Inference Protocol's liveness/readiness (what KServe/Triton-style probes call). Health Watch and
# server reflection are long-lived streams that also list what is served: they need a token.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/Check",
    *(
        f"/{svc}/{m}"
        for svc in ("inference.GRPCInferenceService", "cellserve.oip.GRPCInferenceService")
        for m in ("ServerLive", "ServerReady")
    ),
)
RELOAD_CHECK_S = 1.0  # how often the watcher looks at the files
T = TypeVar("T")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine (``127.x``, ``::1``, ``localhost``)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _stamp(paths: Iterable[Path]) -> tuple[tuple[int, int, int, int], ...]:
    """(inode, mtime_ns, ctime_ns, size) of each file: changes when a file is rewritten or replaced
    (ctime also catches an in-place rewrite whose mtime was preserved).

    Raises ValueError for anything but a regular file (a FIFO or device could block a read for ever).
    """
    out = []
    for p in paths:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{p} is not a regular file")
        out.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return tuple(out)


class WatchedFiles:
    """Files re-read only when their stamps change; a failure is logged once, and the caller keeps the
    previous contents (a half-written or missing file must not take TLS or auth down)."""

    def __init__(self, paths: Iterable[Path | None], what: str) -> None:
        self.paths = [p for p in paths if p is not None]
        self.what = what
        self._stamp: object = _stamp(self.paths)

    def read_if_changed(self, read: Callable[[], T]) -> T | None:
        """``read()`` if the files changed since the last check and it succeeds; else None."""
        try:
            stamp = _stamp(self.paths)
        except (OSError, ValueError) as e:
            if self._stamp != (failure := ("error", str(e))):  # once per distinct failure, not every check
                log.warning("%s cannot be read; keeping the previous ones", self.what, extra={"error": str(e)})
            self._stamp = failure
            return None
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a bad new version is tried once, not at every check
        try:
            return read()
        except (OSError, ValueError) as e:
            log.warning("%s changed but cannot be used; keeping the previous ones", self.what, extra={"error": str(e)})
            return None


class FileWatcher:
    """A daemon thread calling each ``poll`` every ``interval_s`` seconds until ``stop``."""

    def __init__(self, polls: list[Callable[[], None]], interval_s: float = RELOAD_CHECK_S) -> None:
        self._polls = polls
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cellserve-secret-files", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for poll in self._polls:
                try:
                    poll()
                except Exception:  # never let the watcher die: the next change must still be seen
                    log.exception("secret file check failed")


# -- TLS -------------------------------------------------------------------------------------------


def _check_tls(cert: bytes, key: bytes, ca: bytes | None) -> None:
    """ValueError unless ``cert`` is a PEM chain whose first certificate matches ``key`` and ``ca`` parses."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert)
        private = serialization.load_pem_private_key(key, password=None)
        if ca is not None:
            x509.load_pem_x509_certificates(ca)
    except (ValueError, TypeError) as e:  # TypeError: an encrypted key
        raise ValueError(f"not usable PEM: {e}") from e
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise ValueError("the key does not match the certificate")


class CertificateFiles:
    """Server certificate, key and optional client CA (mutual TLS), re-read when the files change.

    ``poll`` (on the watcher thread) reads and checks changed files; gRPC calls ``fetch`` before each
    handshake, which hands over a new configuration once and otherwise answers ``None`` (keep).
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.reloads = 0
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        try:
            self._files = WatchedFiles((cert_file, key_file, client_ca_file), "TLS files")
            self._initial = self._read()  # fail fast on a bad pair at start
        except (OSError, ValueError) as e:
            raise ValueError(
                f"TLS: cannot use certificate {cert_file} with key {key_file}"
                + (f" and client CA {client_ca_file}" if client_ca_file else "")
                + f": {e} (PEM files expected; the key must match the certificate)"
            ) from e

    def _read(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.cert_file.read_bytes(), self.key_file.read_bytes()
        ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        _check_tls(cert, key, ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def poll(self) -> None:
        """Read the files if they changed; a good new set is handed to the next handshake."""
        config = self._files.read_if_changed(self._read)
        if config is None:
            return
        with self._lock:
            self._pending = config
            self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert_file": str(self.cert_file), "reloads": self.reloads})

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake (on a gRPC thread): no I/O here."""
        with self._lock:
            config, self._pending = self._pending, None
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self.client_ca_file is not None
        )


# -- bearer tokens ---------------------------------------------------------------------------------


def parse_tokens(raw: str) -> list[str]:
    """Accepted tokens from a comma-separated string or a JSON list of strings; blanks dropped."""
    text = raw.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ValueError("a JSON token list must hold strings only")
    else:
        items = text.split(",")
    return [t.strip() for t in items if t.strip()]


def _file_tokens(path: Path) -> list[str]:
    """One or more tokens per line (comma-separated or a JSON list); ``#`` lines are comments."""
    tokens: list[str] = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            tokens.extend(parse_tokens(line))
    return tokens


class AcceptedTokens:
    """The tokens from the secret setting plus those in the tokens file, which ``poll`` re-reads.

    The file's current contents are what it contributes: removing a token from it (even the last
    one) revokes it. A file that goes missing or does not parse keeps its previous tokens (warning).
    """

    def __init__(self, secret: str | None, path: Path | None) -> None:
        self._fixed = parse_tokens(secret) if secret else []
        self._path = path
        self._files = WatchedFiles([path], "tokens file")
        self._tokens = self._merge(_file_tokens(path) if path is not None else [])
        if not self._tokens:
            raise ValueError("bearer auth is configured but no token was given (auth_tokens / auth_tokens_file)")

    def _merge(self, from_file: list[str]) -> tuple[bytes, ...]:
        return tuple(t.encode() for t in [*self._fixed, *from_file])

    def current(self) -> tuple[bytes, ...]:
        return self._tokens

    def poll(self) -> None:
        """Re-read the tokens file if it changed (on the watcher thread)."""
        path = self._path
        if path is None or (from_file := self._files.read_if_changed(lambda: _file_tokens(path))) is None:
            return
        self._tokens = self._merge(from_file)
        log.info("bearer tokens reloaded", extra={"file": str(self._path), "count": len(self._tokens)})
        if not self._tokens:
            log.warning("no bearer token is accepted now: every call but the probes is refused")

    def accepts(self, given: bytes) -> bool:
        # compare against every token so the time taken does not tell which one (if any) matched
        hits = [hmac.compare_digest(given, t) for t in self._tokens]
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
