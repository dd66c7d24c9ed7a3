"""The metrics port: Prometheus exposition at ``/metrics`` and nothing else.

prometheus-client's own ``start_http_server`` answers every path with 200 and the metrics body, so an
HTTP probe pointed at ``/healthz`` or ``/v2/health/ready`` on this port would always pass. Here any
other path is a 404 whose body says where metrics and health are. Works with any registry, e.g. the
multiprocess collector's for several worker processes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from cellserve.server.ports import check_free

METRICS_PATH = "/metrics"
NOT_FOUND = (
    b"404 not found: this port serves Prometheus metrics at /metrics only. Health is gRPC on the gRPC port: "
    b"grpc.health.v1.Health/Check (e.g. `cellserve health --server HOST:PORT`, or a Kubernetes grpc probe); "
    b"Triton-style readiness is inference.GRPCInferenceService/ServerReady there too.\n"
)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood stderr."""


def metrics_app(registry: CollectorRegistry) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app: prometheus-client's exposition (content negotiation, gzip, ``name[]=``) at /metrics, 404 else."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return exposition(environ, start_response)
        start_response(
            "404 Not Found", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(NOT_FOUND)))]
        )
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [NOT_FOUND]

    return app


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve ``registry`` at http://host:port/metrics from a daemon thread; port 0 picks a free one.

    The returned server has ``server_port``; stop it with ``shutdown()`` then ``server_close()``.
    """
    address = host.strip("[]")  # "[::]" like --host, or "::"
    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd = make_server(sockaddr[0], port, metrics_app(registry), Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="cellserve-metrics-http", daemon=True).start()
    return httpd


def serve_metrics(host: str, port: int | str, registry: CollectorRegistry) -> WSGIServer:
    """``start_metrics_server`` for the ``metrics_host``/``metrics_port`` settings ("auto": any free port);
    a port it cannot bind is :class:`~cellserve.server.ports.PortTaken`, naming the setting."""
    number = 0 if port == "auto" else int(port)
    try:
        return start_metrics_server(host, number, registry)
    except OSError as e:
        check_free(host, number, "metrics_port")  # names a taken port, or a host not this machine's, precisely
        raise OSError(f"cannot serve /metrics on {host}:{number} (set by --metrics-host/--metrics-port): {e}") from e
