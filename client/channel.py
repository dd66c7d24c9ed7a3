"""How a client reaches a server: targets, channel options (keepalive, message size), TLS, metadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from cellserve.client.connection_pool import ConnectionPool, Probe
from cellserve.client.errors import FailedPreconditionError
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

C = TypeVar("C")  # grpc.Channel or grpc.aio.Channel
# Connections per address (client/connection_pool.py). The kernel puts each on a worker by a hash, so N of
# them miss one of 2 workers with probability 2^(1-N): 1 in 8 for 4, 1 in 128 for 8, 1 in 32768 for 16 (and
# one of 4 workers: 90 %, 40 %, 4 %). They are made on first use: a client with few sessions holds few.
DEFAULT_CONNECTIONS_PER_TARGET = 16


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
    it for the next target, or the same address again: the pool asks a connection that went idle its worker
    again before it reuses it (``ListModels``, at most 2 s on top), and takes another worker's connection
    when it does not answer (that one is not asked again for 5 s); a worker whose open timed out takes no new
    stream for 5 s while another can.

    ``connections_per_target`` (default 16): each address gets up to this many TCP connections of its own.
    Each connection is asked which ``--workers`` process it reached (the kernel spreads connections over
    them, not streams), and each new stream (a session, a resume, a gateway's stream, ``generate``) goes to
    the worker with the fewest, so a process's sessions sit evenly on every worker behind the address. 1 is
    one connection per address, shared with every other client in the process that has the same settings
    (gRPC's global subchannel pool): all their sessions on one worker.
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
    connections_per_target: int = DEFAULT_CONNECTIONS_PER_TARGET

    def __post_init__(self) -> None:
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s is {self.connect_timeout_s}; use seconds > 0")
        n = self.connections_per_target
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"connections_per_target is {n!r}; use a whole number >= 1 (1 = one shared connection)")

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
        if self.connections_per_target > 1:  # each channel its own connection, not the process's shared one
            opts.append(("grpc.use_local_subchannel_pool", 1))
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
    """The connections to each target (a ``ConnectionPool``, made on first use and kept for the client's
    life), plus the preferred target: where new sessions and unary calls go first."""

    def __init__(
        self, targets: tuple[str, ...], make: Callable[[str], C], connections: int = 1, probe: Probe | None = None
    ) -> None:
        """``probe``: how a pool asks a new connection its worker (``connection_pool.ask_worker``); None: never."""
        self.targets = targets
        self.preferred = 0
        self.closed = False
        self._make = make
        self._connections = connections
        self._probe = probe if connections > 1 else None  # one connection: nothing to choose
        self._pools: dict[str, ConnectionPool[C]] = {}
        self.pool(targets[0])

    def pool(self, target: str) -> ConnectionPool[C]:
        if self.closed:
            raise FailedPreconditionError("the client is closed; its sessions cannot open or resume (use a new client)")
        pool = self._pools.get(target)
        if pool is None:
            pool = self._pools[target] = ConnectionPool(target, self._connections, self._make, self._probe)
        return pool

    async def astart(self, target: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start a streaming call on a grpc.aio pool: ``method`` on the connection ``apick`` chose."""
        pool = self.pool(target)
        index = await pool.apick()
        return pool.start(method, *args, index=index, **kwargs)

    def channel(self, target: str) -> C:
        """The target's first connection (unary calls, readiness)."""
        return self.pool(target).channel()

    def stub(self, target: str) -> pb_grpc.CellServeStub:
        """A stub on the target's first connection, for unary calls: any worker answers them alike."""
        return self.pool(target).stub()

    def stream(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """Start a session's ``Stream`` on the connection the target's pool picks (a resume may take any)."""
        return self.pool(target).start("Stream", *args, **kwargs)

    async def astream(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """``stream`` for grpc.aio channels."""
        return await self.astart(target, "Stream", *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Start a ``Generate`` on the connection the current target's pool picks."""
        return self.pool(self.current).start("Generate", *args, **kwargs)

    @property
    def current(self) -> str:
        return self.targets[self.preferred]

    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel(self.current))

    def close(self) -> list[C]:
        """Mark the client closed (no new streams) and return its channels, for the caller to close."""
        self.closed = True
        return [channel for pool in self._pools.values() for channel in pool.channels()]
