"""How a client reaches a server: targets, channel options (keepalive, message size), TLS, metadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from cellserve.client.errors import FailedPreconditionError
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

C = TypeVar("C")  # grpc.Channel or grpc.aio.Channel


def _read(source: bytes | str | Path | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True)
class TLS:
    """TLS settings. Paths or PEM bytes; a client certificate and key together enable mutual TLS."""

    root_certificates: bytes | str | Path | None = None  # None: the system's roots
    client_certificate: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None  # override the name checked against the server's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("TLS: give both client_certificate and client_key, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_certificate),
        )


@dataclass(frozen=True)
class ChannelConfig:
    """Everything about the connection except the target.

    Defaults suit long-lived streams: HTTP/2 keepalive pings every 30 s (so idle NATs and proxies don't
    drop a quiet session silently) and 16 MiB messages (the server's default limit).

    ``connect_timeout_s`` bounds each open of a session's stream (a new session, a resume, a move),
    connecting included, and each of gRPC's connection attempts: a target that accepts TCP but never
    answers (a hung or stopped process; a ``--workers`` worker until its supervisor kills it) is left after
    it for the next target, or the same address again, where a new connection may reach another worker.
    """

    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    keepalive_without_calls: bool = False
    tls: TLS | None = None
    bearer_token: str | None = None  # sent as "authorization: Bearer <token>" on every call
    metadata: tuple[tuple[str, str], ...] = ()
    extra_options: tuple[tuple[str, Any], ...] = field(default=())
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s is {self.connect_timeout_s}; use seconds > 0")

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.http2.ping_timeout_ms", self.keepalive_timeout_ms),  # else gRPC core waits 60 s for the ack
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC's minimum connect timeout, whatever the name says (default 20 s): until the HTTP/2 handshake
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout_s * 1000)),
        ]
        if self.tls is not None and self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return opts + list(self.extra_options)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        md = tuple((k.lower(), v) for k, v in self.metadata)
        if self.bearer_token:
            md += (("authorization", f"Bearer {self.bearer_token}"),)
        return md

    def sync_channel(self, target: str) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(target, options=self.options())
        return grpc.secure_channel(target, self.tls.credentials(), options=self.options())

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(target, options=self.options())
        return grpc.aio.secure_channel(target, self.tls.credentials(), options=self.options())


def normalize_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """One address or several (``HOST:PORT``); several are the candidates a resuming session may move to."""
    targets = (target,) if isinstance(target, str) else tuple(target)
    if not targets or not all(targets):
        raise ValueError("give at least one non-empty target address HOST:PORT")
    return targets


class Channels(Generic[C]):
    """One channel (and its stubs) per target, made on first use and kept for the client's life, plus
    the preferred target: where new sessions and unary calls go first."""

    def __init__(self, targets: tuple[str, ...], make: Callable[[str], C]) -> None:
        self.targets = targets
        self.preferred = 0
        self.closed = False
        self._make = make
        self._channels: dict[str, C] = {targets[0]: make(targets[0])}
        self._stubs: dict[str, pb_grpc.CellServeStub] = {}

    def channel(self, target: str) -> C:
        if self.closed:
            raise FailedPreconditionError("the client is closed; its sessions cannot open or resume (use a new client)")
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = self._make(target)
        return channel

    def stub(self, target: str) -> pb_grpc.CellServeStub:
        stub = self._stubs.get(target)
        if stub is None or self.closed:
            stub = self._stubs[target] = pb_grpc.CellServeStub(self.channel(target))
        return stub

    @property
    def current(self) -> str:
        return self.targets[self.preferred]

    def current_stub(self) -> pb_grpc.CellServeStub:
        return self.stub(self.current)

    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel(self.current))

    def close(self) -> list[C]:
        """Mark the client closed (no new streams) and return its channels, for the caller to close."""
        self.closed = True
        return list(self._channels.values())
