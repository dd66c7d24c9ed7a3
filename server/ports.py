"""Ports: a taken port is a one-line error naming the setting, never a silent share.

gRPC sets SO_REUSEPORT on its listening sockets by default, so a second server on a taken port
would bind "successfully" and take part of the new connections. A single serving process
therefore binds with ``grpc.so_reuseport=0`` and checks its ports up front (:func:`check_free`).
``--workers N`` shares the port on purpose: its supervisor checks the port the same way, then holds
a :class:`PortGuard` — a bound, never-listening SO_REUSEPORT socket — for as long as it runs, so its
own workers can join the port and any other server that tries is refused.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

_FLAGS = {
    "port": "--port / CELLSERVE_PORT",
    "metrics_port": "--metrics-port / CELLSERVE_METRICS_PORT; 0 turns the endpoint off",
}


class PortTaken(OSError):
    """Another process holds a port this server was configured to use."""

    def __init__(self, host: str, port: int, setting: str) -> None:
        where = f"{host}:{port}" if ":" not in host or host.startswith("[") else f"[{host}]:{port}"
        super().__init__(
            errno.EADDRINUSE,
            f"{where} is already in use by another process (set by {_FLAGS.get(setting, setting)}); "
            "stop the other server, or choose another port",
        )
        self.host, self.port, self.setting = host, port, setting

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class _Address:
    family: int
    sockaddr: tuple


def _addresses(host: str, port: int) -> list[_Address]:
    """What gRPC would bind for ``host`` (brackets stripped; one per resolved family and address)."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return []  # gRPC reports an unresolvable host itself
    seen, out = set(), []
    for family, _, _, _, sockaddr in infos:
        key = (family, sockaddr[:2])
        if key not in seen:
            seen.add(key)
            out.append(_Address(family, sockaddr))
    return out


def _socket(address: _Address, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    if address.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as gRPC binds [::]: both stacks
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
    return sock


def check_free(host: str, port: int, setting: str) -> None:
    """Raise PortTaken if something listens on (or guards) ``host:port``, OSError if ``host`` is not this
    machine's; port 0 is always free (the bind then checks only the address)."""
    for address in _addresses(host, port):
        with _socket(address, reuse_port=False) as sock:
            try:
                sock.bind(address.sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortTaken(host, port, setting) from None
                if e.errno == errno.EADDRNOTAVAIL:
                    flag = "--host" if setting == "port" else "--" + setting.replace("_port", "-host")
                    raise OSError(f"{host} is not an address of this machine (set by {flag}); use one of its "
                                  "addresses, [::] or 0.0.0.0 for all, 127.0.0.1 for this machine only") from None
                # anything else (no IPv6 here, say) is for gRPC's own bind to report


class PortGuard:
    """Holds ``host:port`` for this server's own SO_REUSEPORT workers, and against everyone else."""

    def __init__(self, host: str, port: int) -> None:
        check_free(host, port, "port")
        self.host = host
        self._sockets: list[socket.socket] = []
        chosen = port  # port 0: the first address picks one, the others bind the same
        try:
            for address in _addresses(host, port):
                sock = _socket(address, reuse_port=True)
                self._sockets.append(sock)
                sock.bind((address.sockaddr[0], chosen, *address.sockaddr[2:]))
                chosen = sock.getsockname()[1]
        except OSError as e:
            self.close()
            if e.errno == errno.EADDRINUSE:
                raise PortTaken(host, port, "port") from None
            raise
        if not self._sockets:
            raise OSError(f"cannot resolve the gRPC host {host!r} (setting host: --host / CELLSERVE_HOST)")

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1])

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
