"""Channel settings reach the wire: TLS (server-verified and mutual), bearer token and metadata, options."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cellserve.client import TLS, ChannelConfig, Client, UnauthenticatedError, UnavailableError
from cellserve.server.cli import main as cellserve_main

TOKEN = "s3cret"


@dataclass
class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the bearer token; records the metadata of every call."""

    seen: list[dict[str, str]] = field(default_factory=list)

    def intercept_service(self, continuation, handler_call_details):
        md = dict(handler_call_details.invocation_metadata)
        self.seen.append(md)
        if md.get("authorization") != f"Bearer {TOKEN}":

            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

            return grpc.unary_unary_rpc_method_handler(refuse)
        return continuation(handler_call_details)


@dataclass
class HealthServer:
    port: int
    auth: AuthInterceptor
    servicer: health.HealthServicer


def _health_server(credentials: grpc.ServerCredentials | None) -> Iterator[HealthServer]:
    auth = AuthInterceptor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[auth])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (
        server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    )
    server.start()
    try:
        yield HealthServer(port, auth, servicer)
    finally:
        server.stop(0).wait(10)


@pytest.fixture
def mtls_server(pki: Any) -> Iterator[HealthServer]:
    creds = grpc.ssl_server_credentials([(pki.server.key, pki.server.cert)], pki.ca.pem, require_client_auth=True)
    yield from _health_server(creds)


@pytest.fixture
def plain_server() -> Iterator[HealthServer]:
    yield from _health_server(None)


def test_mutual_tls_with_bearer_token_and_metadata_reaches_the_server(mtls_server, pki, tmp_path: Path):
    (tmp_path / "ca.pem").write_bytes(pki.ca.pem)  # paths and PEM bytes are both accepted
    tls = TLS(root_certificates=tmp_path / "ca.pem", client_certificate=pki.client.cert, client_key=pki.client.key)
    config = ChannelConfig(tls=tls, bearer_token=TOKEN, metadata=(("X-Tenant", "blue"),))
    with Client(f"localhost:{mtls_server.port}", config, timeout_s=10) as client:
        assert client.health() == "SERVING"
    md = mtls_server.auth.seen[-1]
    assert md["authorization"] == f"Bearer {TOKEN}" and md["x-tenant"] == "blue"


def test_missing_token_is_unauthenticated_with_the_server_message(mtls_server, pki):
    tls = TLS(root_certificates=pki.ca.pem, client_certificate=pki.client.cert, client_key=pki.client.key)
    config = ChannelConfig(tls=tls)
    with (
        Client(f"localhost:{mtls_server.port}", config, timeout_s=10) as client,
        pytest.raises(UnauthenticatedError) as e,
    ):
        client.health()
    assert e.value.details == "missing or wrong bearer token"


def test_tls_without_the_client_certificate_is_refused(mtls_server, pki):
    config = ChannelConfig(tls=TLS(root_certificates=pki.ca.pem), bearer_token=TOKEN)
    with Client(f"localhost:{mtls_server.port}", config, timeout_s=5) as client, pytest.raises(UnavailableError):
        client.health()


def test_half_a_client_certificate_is_a_configuration_error(pki):
    with pytest.raises(ValueError, match="both client_certificate and client_key"):
        ChannelConfig(tls=TLS(pki.ca.pem, client_certificate=pki.client.cert)).sync_channel("localhost:1")


def test_channel_options_carry_keepalive_and_message_size():
    opts = dict(ChannelConfig(max_message_bytes=1234, keepalive_time_ms=777).options())
    assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"] == 1234
    assert opts["grpc.keepalive_time_ms"] == 777
    assert dict(ChannelConfig(tls=TLS(server_name="svc")).options())["grpc.ssl_target_name_override"] == "svc"


def test_health_cli_exit_code_follows_serving(plain_server, capsys):
    address = f"127.0.0.1:{plain_server.port}"
    assert cellserve_main(["health", "--server", address, "--token", TOKEN]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    plain_server.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert cellserve_main(["health", "--server", address, "--token", TOKEN]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"
    assert cellserve_main(["health", "--server", address]) == 1  # no token: unauthenticated
    assert "UNAUTHENTICATED" in capsys.readouterr().out
