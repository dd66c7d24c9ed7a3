"""Wiring: ``build_server(settings, registry)`` builds one serving process; ``run_until_signal`` runs it.

Start-up order: bind the gRPC port (a taken port fails here, before any model loads), load and warm
every model, start serving, then flip health to SERVING and write the ready file. Shutdown
(SIGTERM/SIGINT): health NOT_SERVING, refuse new sessions, push resume tokens, let in-flight work
finish within ``grace_s``, stop the schedulers. ``cellserve serve`` itself is in ``serve.py``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import ErrorBoundary
from cellserve.server.health import Health
from cellserve.server.interceptors import RequestGuard, grpc_receive_limit
from cellserve.server.limits import StreamLimit
from cellserve.server.metrics import Metrics
from cellserve.server.metrics_http import serve_metrics
from cellserve.server.models import ModelRepository
from cellserve.server.oip.servicer import REFLECTION_ALIASES
from cellserve.server.oip.servicer import register as register_oip
from cellserve.server.ports import check_free
from cellserve.server.reflection import enable_reflection
from cellserve.server.resume_token import TokenCodec, TokenKeys
from cellserve.server.security import AcceptedTokens, BearerAuth, CertificateFiles, FileWatcher, is_loopback
from cellserve.server.servicer import ONE_PROCESS, CellServeServicer
from cellserve.server.servicer import add_to_server as add_native_service
from cellserve.server.sessions import SessionManager
from cellserve.server.settings import Settings
from cellserve.server.trace_config import build_tracing
from cellserve.v1 import cellserve_pb2

log = logging.getLogger(__name__)

FLUSH_S = 1.0  # after a drain closed every session: time for final tokens to reach clients, even with grace 0


@dataclass(frozen=True)
class Services:
    """What a service on the port is handed: the dataplane, and the parts of the edge every service shares.

    The whole of a servicer's dependencies (nothing else of the app): handlers translate protobuf and call
    ``plane``; ``streams`` counts their streams against ``max_streams``; ``errors`` turns domain errors into
    statuses; ``metrics`` is for the edge's own gauges (e.g. paused streams)."""

    plane: DataPlane
    health: Health
    errors: ErrorBoundary
    streams: StreamLimit
    metrics: Metrics


# (grpc server, Services) -> the full service names it registered (for reflection).
ServicerHook = Callable[[grpc.aio.Server, Services], list[str]]


class CellServer:
    """One serving process: models, sessions, gRPC server, health, metrics endpoint."""

    def __init__(
        self, settings: Settings, registry: CollectorRegistry, *, reuse_port: bool = False,
        worker: tuple[int, int] = ONE_PROCESS,
    ) -> None:  # fmt: skip
        """``reuse_port``: join a port shared on purpose (a ``--workers`` supervisor's); else a taken port fails.
        ``worker``: this process's (index, count) among those sharing the port, told to clients (ListModels)."""
        self.settings = settings
        self.registry = registry
        self.reuse_port = reuse_port
        self.metrics = Metrics(registry)
        self.tracing = build_tracing(settings, self.metrics.trace_spans_dropped)  # before the models: fail fast
        self.models = ModelRepository.load(settings, self.metrics, self.tracing)
        self.sessions = SessionManager(self.models, settings, self.metrics)
        self.health = Health([m.name for m in self.models])
        keys = TokenKeys.from_settings(settings, unset="resume tokens will only be accepted by this process")
        self.tokens = TokenCodec(keys, settings.token_ttl_s)
        self.errors = ErrorBoundary(self.metrics.errors)
        self.streams = StreamLimit(settings.max_streams)  # Stream, Generate and OIP streams together
        self.plane = DataPlane(self.models, self.sessions, self.tokens, settings, self.tracing)
        self.services = Services(self.plane, self.health, self.errors, self.streams, self.metrics)
        self.servicer = CellServeServicer(self.plane, self.errors, self.streams, worker)
        self.tls = (
            CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.tls_cert_file is not None and settings.tls_key_file is not None
            else None
        )
        self.auth_tokens = (
            AcceptedTokens(
                settings.auth_tokens.get_secret_value() if settings.auth_tokens is not None else None,
                settings.auth_tokens_file,
            )
            if settings.auth_enabled
            else None
        )
        self.port = 0
        self.metrics_port = 0
        polls = [w.poll for w in (self.tls, self.auth_tokens) if w is not None]
        self._watcher = FileWatcher(polls) if polls else None
        self._hooks: list[ServicerHook] = []
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None
        self._grace_over: asyncio.Event | None = None  # set by end_grace(): a drain stops waiting
        self._releasing: asyncio.Future[None] | None = None  # drain(release_port=True): listening stopped

    def add_servicer(self, hook: ServicerHook) -> None:
        """Register another service on the same port (call before ``start``)."""
        self._hooks.append(hook)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Applied to every service on the port, outermost first: authentication before anything else."""
        chain: list[grpc.aio.ServerInterceptor] = []
        if self.auth_tokens is not None:
            denied = self.metrics.errors.labels(code=grpc.StatusCode.UNAUTHENTICATED.name)
            chain.append(BearerAuth(self.auth_tokens, on_deny=denied.inc))
        rejected = self.metrics.errors
        return [*chain, RequestGuard(self.settings.max_message_bytes, lambda code: rejected.labels(code=code).inc())]

    def grpc_options(self) -> list[tuple[str, Any]]:
        s = self.settings
        options: list[tuple[str, Any]] = [
            # Above our own limit, so the request guard sees oversized requests and names the setting.
            ("grpc.max_receive_message_length", grpc_receive_limit(s.max_message_bytes)),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            # gRPC core waits for a ping's ack up to ping_timeout_ms (default 60 s), whatever keepalive_timeout_ms
            # says: without this a frozen peer keeps its sessions ~a minute longer than keepalive_timeout_s.
            ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            # Long-lived, often quiet streams: accept client keepalive pings at the configured rate.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(s.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC's default is 1: a second server on a taken port would silently take half its connections.
            ("grpc.so_reuseport", int(self.reuse_port)),
        ]
        if s.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
            ]
        return options

    async def start(self) -> None:
        s = self.settings
        server = grpc.aio.server(options=self.grpc_options(), interceptors=self.interceptors())
        # One process binds first, so a taken port fails before any model warms up. A worker binds last:
        # its port is shared, and connections the kernel hands a socket that is not serving yet would wait.
        if not self.reuse_port:
            self.port = self._bind(server)
        await self.health.not_serving()  # the servicer's default for "" would be SERVING
        for model in self.models:  # every batch size the scheduler can form at T=1: no binding on the hot path
            model.engine.warmup(list(range(1, model.scheduler.max_batch + 1)))
            model.scheduler.start()
        self.sessions.start()
        add_native_service(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        names = [
            cellserve_pb2.DESCRIPTOR.services_by_name["CellServe"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        for hook in self._hooks:
            names += hook(server, self.services)
        enable_reflection(server, names, REFLECTION_ALIASES)
        if self.reuse_port:
            self.port = self._bind(server)
        await server.start()
        self._grpc = server
        if self._watcher is not None:
            self._watcher.start()
        if s.metrics_port:
            self._http = serve_metrics(s.metrics_host, s.metrics_port, self.registry)
            self.metrics_port = self._http.server_port
        await self.health.serving()
        tls = "mutual" if s.tls_client_ca_file else "on" if self.tls is not None else "off"
        log.info(
            "serving",
            extra={
                "address": f"{s.host}:{self.port}",
                "port": self.port,
                "metrics": f"{s.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                "metrics_port": self.metrics_port,
                "models": {m.name: m.manifest.sha256 for m in self.models},  # name: ONNX sha256
                "device": f"cuda:{s.device_id}" if s.device == "cuda" else s.device,
                "tls": tls,
                "auth": "bearer" if self.auth_tokens is not None else "off",
                "oip": s.oip,
                "capacity": s.capacity,
                "pid": os.getpid(),
            },
        )
        if tls == "off" and self.auth_tokens is None and not is_loopback(s.host):
            log.warning(
                "the gRPC port is open to the network without TLS or bearer tokens",
                extra={
                    "address": f"{s.host}:{self.port}",
                    "reason": "anyone who can reach it may open sessions and read resume tokens",
                    "fix": "--host 127.0.0.1 keeps it local; --tls-cert-file/--auth-tokens protect it",
                },
            )
        if s.ready_file is not None:
            tmp = Path(f"{s.ready_file}.tmp")
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid()}))
            tmp.replace(s.ready_file)

    def _bind(self, server: grpc.aio.Server) -> int:
        s = self.settings
        address = f"{s.host}:{s.port}"
        try:
            if self.tls is not None:
                port = server.add_secure_port(address, self.tls.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            if not self.reuse_port:
                check_free(s.host, s.port, "port")  # names a taken port, or a host not this machine's, precisely
            reason = str(e).split("; set GRPC_VERBOSITY")[0]  # gRPC's hint points at its own debug logs
            raise OSError(f"cannot bind the gRPC port {address} (set by --host/--port): {reason}") from None
        if port == 0:
            raise OSError(f"cannot bind the gRPC port {address} (set by --host/--port)")
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new sessions, give in-flight RPCs ``grace_s``, then stop."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        await self.health.not_serving()
        self.sessions.refuse_opens()
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        for model in self.models:
            await model.scheduler.stop()
        await self.sessions.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.tracing is not None:  # last: the sessions' spans end above; flushing may wait for the collector
            tracing, self.tracing = self.tracing, None
            await asyncio.to_thread(tracing.shutdown)

    async def drain(self, grace_s: float | None = None, *, release_port: bool = False) -> None:
        """Zero-loss shutdown: NOT_SERVING, refuse opens (UNAVAILABLE), push every live session a
        ``draining{resume_token, deadline}``, let them leave within ``grace_s``, close the rest, stop.

        ``release_port``: stop listening first (open streams go on), so that a replacement can bind the port
        now: a ``--workers`` worker whose supervisor died."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        await self.health.not_serving()
        if release_port and self._grpc is not None:  # grpc stops listening at once; stop() below ends the calls
            self._releasing = asyncio.ensure_future(self._grpc.stop(grace + FLUSH_S))
            await asyncio.sleep(0)
        started = time.monotonic()
        deadline_ms = int((time.time() + grace) * 1000)
        held = self.sessions.count
        told = self.sessions.begin_drain(deadline_ms)
        log.info("draining", extra={"sessions": held, "sent_resume_token": told, "grace_s": grace})
        left_in_time = await self._wait_empty_or_grace_over(grace)
        remaining = self.sessions.count
        if not left_in_time:
            self.sessions.close_all("drain", "the drain grace period ended; resume with the draining token")
        await self.stop(grace_s=FLUSH_S)  # closed streams end by themselves; this lets their last messages out
        log.info(
            "drained",
            extra={
                "sessions": held,
                "left_within_grace": held - remaining,
                "closed_at_grace_end": remaining,
                "grace_s": grace,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    def end_grace(self) -> None:
        """Cut a drain's grace period short: the sessions still open are closed now (they hold their token)."""
        if self._grace_over is not None:
            self._grace_over.set()

    async def _wait_empty_or_grace_over(self, grace_s: float) -> bool:
        self._grace_over = asyncio.Event()
        empty = asyncio.ensure_future(self.sessions.wait_empty(grace_s))
        over = asyncio.ensure_future(self._grace_over.wait())
        await asyncio.wait((empty, over), return_when=asyncio.FIRST_COMPLETED)
        over.cancel()
        if not empty.done():
            empty.cancel()
            return False
        return empty.result()


def build_server(
    settings: Settings, registry: CollectorRegistry, *, reuse_port: bool = False, worker: tuple[int, int] = ONE_PROCESS
) -> CellServer:
    """Build (not start) a server. Call ``await server.start()`` inside a running event loop."""
    server = CellServer(settings, registry, reuse_port=reuse_port, worker=worker)
    if settings.oip:
        server.add_servicer(register_oip)
    return server


async def run_until_signal(
    settings: Settings, *, reuse_port: bool = False, on_ready: Callable[[int, int], None] | None = None,
    orphaned: Callable[[], bool] | None = None, worker: tuple[int, int] = ONE_PROCESS,
) -> None:  # fmt: skip
    """Serve until SIGTERM/SIGINT, then drain. ``on_ready(port, metrics_port)`` once SERVING (workers);
    ``orphaned()`` true at the signal (a worker whose supervisor died): the drain frees the port first."""
    if not reuse_port:  # one process: a taken port is an error before any model loads
        check_free(settings.host, settings.port, "port")
        if settings.metrics_port != 0:  # "auto" binds port 0: then only the address is checked
            port = 0 if settings.metrics_port == "auto" else int(settings.metrics_port)
            check_free(settings.metrics_host, port, "metrics_port")
    server = build_server(settings, CollectorRegistry(), reuse_port=reuse_port, worker=worker)
    await server.start()
    # Everything built so far (models, sessions of onnxruntime, protobuf descriptors) lives as long as the
    # process: out of the collector's sight, full collections stop re-scanning it on the per-message path.
    gc.freeze()
    if on_ready is not None:
        on_ready(server.port, server.metrics_port)
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        if len(received) == 1:
            stop.set()
        elif name == "SIGINT":  # Ctrl-C again: an operator at a terminal, not an orchestrator
            log.warning("second interrupt: ending the drain's grace period now", extra={"signal": name})
            server.end_grace()
        else:
            log.info(
                "already draining; signal ignored",
                extra={"signal": name, "hint": "SIGINT (Ctrl-C) ends the grace period now; SIGKILL stops at once"},
            )

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await stop.wait()
    log.info("signal received; draining", extra={"signal": received[0], "grace_s": settings.grace_s})
    await server.drain(release_port=orphaned is not None and orphaned())
    log.info("stopped", extra={"signal": received[0]})
