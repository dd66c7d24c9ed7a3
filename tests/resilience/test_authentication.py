"""Who may connect, checked hostilely on real servers (loopback, port 0): bearer-token header variants, every
service gated but the probes, mutual TLS refusing plaintext / wrong-name / out-of-date client certificates, and
a bearer-auth configuration without any token failing closed."""

from __future__ import annotations

import datetime
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from replica_helpers import health, open_stream, token_keys

from cellserve.client import TLS, UnavailableError
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

KEYS = token_keys("3c")

GOOD = "good-token"


BEARER_CASES = [  # (metadata, accepted)
    ((("authorization", f"Bearer {GOOD}"),), True),
    ((("authorization", f"bearer {GOOD}"),), True),  # the scheme is case-insensitive (RFC 7235)
    ((("authorization", f"Bearer   {GOOD}  "),), True),  # surrounding spaces are not part of the token
    ((("authorization", f"Bearer {GOOD}"), ("authorization", "Bearer bad")), True),  # the first one counts
    ((("authorization", "Bearer bad"), ("authorization", f"Bearer {GOOD}")), False),
    ((("authorization", f" Bearer {GOOD}"),), False),
    ((("authorization", "Bearer good"),), False),  # a prefix of a real token
    ((("authorization", f"Bearer {GOOD}x"),), False),
    ((("authorization", f"Bearer {GOOD},tok2"),), False),  # the server's CSV syntax is not a client's
    ((("authorization", "Bearer"),), False),
    ((("authorization", "Bearer "),), False),
    ((("authorization", GOOD),), False),  # no scheme
    ((("authorization-bin", f"Bearer {GOOD}".encode()),), False),
    ((("x-authorization", f"Bearer {GOOD}"),), False),
    ((("authorization", "Bearer " + "x" * 6000),), False),
]


def test_bearer_header_variants(running_server) -> None:
    with running_server(auth_tokens=f"{GOOD},tok2") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.CellServeStub(ch)
        for metadata, accepted in BEARER_CASES:
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            assert code == (grpc.StatusCode.OK if accepted else grpc.StatusCode.UNAUTHENTICATED), metadata
            assert open_stream(ch, metadata=metadata)[0] == code, metadata  # the stream is gated the same way


def test_every_service_but_the_probes_needs_the_token(running_server) -> None:
    gated_unary = [
        "/cellserve.v1.CellServe/ListModels",
        "/cellserve.v1.CellServe/ModelInfo",
        *(
            f"/inference.GRPCInferenceService/{m}"
            for m in ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer", "ModelConfig", "RepositoryIndex")
        ),
    ]
    with running_server(auth_tokens=GOOD) as srv, grpc.insecure_channel(srv.address) as ch:
        for method in gated_unary:
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(method)(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        with pytest.raises(grpc.RpcError) as err:
            list(ch.unary_stream("/cellserve.v1.CellServe/Generate")(b"", timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for method in ("/cellserve.v1.CellServe/Stream", "/inference.GRPCInferenceService/ModelStreamInfer"):
            with pytest.raises(grpc.RpcError) as err:
                list(ch.stream_stream(method)(iter([b""]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        # open for probes: OIP live/ready and health Check, without any token; Watch needs one
        for method in ("ServerLive", "ServerReady"):
            assert ch.unary_unary(f"/inference.GRPCInferenceService/{method}")(b"", timeout=10) == b"\x08\x01"
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as err:
            next(health.Watch(health_pb2.HealthCheckRequest(service="tiny"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _leaf(
    ca: Any, cn: str, *, valid_from_days: float, valid_to_days: float, is_ca: bool = False
) -> tuple[bytes, bytes]:
    """A client certificate signed by ``ca`` with a chosen validity window and CA flag; (cert, key) PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_from_days))
        .not_valid_after(now + datetime.timedelta(days=valid_to_days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def test_mutual_tls_refuses_plaintext_wrong_name_and_out_of_date_client_certificates(running_server, pki, tmp_path):
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    with running_server(**settings) as srv:
        target = f"localhost:{srv.server.port}"
        good = TLS(f["ca"], pki.client.cert, pki.client.key)
        assert health(target, good) == "SERVING"
        assert health(f"127.0.0.1:{srv.server.port}", good) == "SERVING"  # the IP SAN matches too
        expired = _leaf(pki.ca, "expired", valid_from_days=-10, valid_to_days=-1)
        not_yet = _leaf(pki.ca, "not-yet", valid_from_days=1, valid_to_days=3)
        wrong_name = TLS(f["ca"], pki.client.cert, pki.client.key, server_name="not-the-server.example")
        for bad in (None, wrong_name, TLS(f["ca"], *expired), TLS(f["ca"], *not_yet)):
            with pytest.raises(UnavailableError):
                health(target, bad)


@pytest.mark.parametrize("tokens", ["", " ", " , ", "[]", '[""]'])
def test_bearer_auth_configured_without_any_token_refuses_to_start(tokens, tiny_model_dir, tmp_path) -> None:
    """Fail closed: an empty token list never means "auth off" (secret or file alike)."""
    from prometheus_client import CollectorRegistry

    from cellserve.server.app import build_server
    from cellserve.server.settings import Settings

    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# no tokens yet\n{tokens}\n")  # '#' starts a comment in the file only
    for given in ({"auth_tokens": tokens}, {"auth_tokens_file": tokens_file}):
        settings = Settings(model_dirs=[tiny_model_dir], metrics_port=0, **given)
        assert settings.auth_enabled
        with pytest.raises(ValueError, match="no token"):
            build_server(settings, CollectorRegistry())

