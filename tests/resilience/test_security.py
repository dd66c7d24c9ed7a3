"""Who may talk to the server: TLS, mutual TLS and bearer tokens on a real server (loopback, port 0).

Certificates are generated per test session by the ``pki`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from cellserve.client import TLS, ChannelConfig, Client, UnauthenticatedError, UnavailableError
from cellserve.server.app import build_server
from cellserve.server.security import MESSAGE, AcceptedTokens
from cellserve.server.settings import Settings
from cellserve.v1 import cellserve_pb2, cellserve_pb2_grpc

TOKENS = "old-token, new-token"


def _steps_match_oracle(client: Client, oracle: Any) -> None:
    tokens = np.arange(7, dtype=np.int64)
    with client.session("tiny") as s:
        y = s.step(tokens)
    h, c = oracle.init_state(1)
    np.testing.assert_allclose(y, oracle.run(tokens[None], h, c)[0][0], atol=1e-5, rtol=0)


# -- TLS and mutual TLS ----------------------------------------------------------------------------


def test_tls_accepts_the_right_ca_and_refuses_others(running_server, pki, tmp_path: Path, tiny_oracle) -> None:
    f = pki.write(tmp_path)
    with running_server(tls_cert_file=f["server_cert"], tls_key_file=f["server_key"]) as srv:
        target = f"localhost:{srv.server.port}"
        with Client(target, ChannelConfig(tls=TLS(root_certificates=f["ca"])), timeout_s=10) as client:
            assert [m.name for m in client.list_models()] == ["tiny"]
            _steps_match_oracle(client, tiny_oracle)
        for wrong in (ChannelConfig(tls=TLS(root_certificates=f["other_ca"])), ChannelConfig()):  # other CA, plaintext
            with Client(target, wrong, timeout_s=5) as client, pytest.raises(UnavailableError):
                client.list_models()


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    running_server, pki, tmp_path: Path, tiny_oracle
) -> None:
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    with running_server(**settings) as srv:
        target = f"localhost:{srv.server.port}"
        good = TLS(root_certificates=f["ca"], client_certificate=pki.client.cert, client_key=pki.client.key)
        with Client(target, ChannelConfig(tls=good), timeout_s=10) as client:
            _steps_match_oracle(client, tiny_oracle)
        stranger = TLS(f["ca"], client_certificate=pki.other_client.cert, client_key=pki.other_client.key)
        for bad in (TLS(root_certificates=f["ca"]), stranger):  # no client certificate; one from another CA
            with Client(target, ChannelConfig(tls=bad), timeout_s=5) as client, pytest.raises(UnavailableError):
                client.health()


def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    running_server, pki, tmp_path: Path
) -> None:
    f = pki.write(tmp_path)
    with running_server(tls_cert_file=f["server_cert"], tls_key_file=f["server_key"]) as srv:
        target = f"localhost:{srv.server.port}"

        def health(ca: Path) -> str:
            with Client(target, ChannelConfig(tls=TLS(root_certificates=ca)), timeout_s=5) as client:
                return client.health()

        tls = srv.server.tls
        assert health(f["ca"]) == "SERVING"
        f["server_cert"].write_text("not a certificate")  # a half-done rotation: keep serving the old one
        tls.poll()  # what the watcher thread does every RELOAD_CHECK_S; called here to not wait for it
        assert health(f["ca"]) == "SERVING"
        rotated = pki.other_ca.issue("localhost")
        f["server_key"].write_bytes(rotated.key)
        f["server_cert"].write_bytes(rotated.cert)
        tls.poll()
        assert health(f["other_ca"]) == "SERVING"  # the first handshake after the check uses the new pair
        with pytest.raises(UnavailableError):
            health(f["ca"])
        assert srv.server.tls.reloads == 1


def test_tls_settings_are_checked_before_serving(pki, tmp_path: Path, tiny_model_dir: Path) -> None:
    f = pki.write(tmp_path)
    with pytest.raises(ValueError, match="give both"):
        Settings(model_dirs=[tiny_model_dir], tls_cert_file=f["server_cert"])
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        Settings(model_dirs=[tiny_model_dir], tls_client_ca_file=f["ca"])
    with pytest.raises(ValueError, match="does not point to a file"):
        Settings(model_dirs=[tiny_model_dir], tls_cert_file=tmp_path / "nope.pem", tls_key_file=f["server_key"])
    mismatched = Settings(model_dirs=[tiny_model_dir], tls_cert_file=f["server_cert"], tls_key_file=f["client_key"])
    with pytest.raises(ValueError, match="the key must match the certificate"):
        build_server(mismatched, CollectorRegistry())


def test_serve_reports_a_bad_tls_flag_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    cmd = [sys.executable, "-m", "cellserve.server.cli", "serve", "--model-dirs", str(tiny_model_dir)]
    out = subprocess.run([*cmd, "--tls-key-file", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--tls-key-file" in out.stderr


# -- bearer tokens ---------------------------------------------------------------------------------


def _raw_stream(target: str, metadata: tuple | None, payload: bytes) -> grpc.RpcError:
    """Send ``payload`` bytes as the first Stream message; return the error the call ends with."""
    with grpc.insecure_channel(target) as ch:
        call = ch.stream_stream("/cellserve.v1.CellServe/Stream")(iter([payload]), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    return err.value


def test_bearer_tokens_gate_every_call_but_the_health_check(running_server, tiny_oracle) -> None:
    with running_server(auth_tokens=TOKENS) as srv:
        for token in ("old-token", "new-token"):  # several accepted: rotation without downtime
            with Client(srv.address, ChannelConfig(bearer_token=token), timeout_s=10) as client:
                assert [m.name for m in client.list_models()] == ["tiny"]
                _steps_match_oracle(client, tiny_oracle)
        for token in (None, "wrong", "old-token-but-longer", ""):
            with Client(srv.address, ChannelConfig(bearer_token=token), timeout_s=10) as client:
                with pytest.raises(UnauthenticatedError) as err:
                    client.list_models()
                assert err.value.details == MESSAGE
                with pytest.raises(UnauthenticatedError):
                    _steps_match_oracle(client, tiny_oracle)
        # a token in the wrong scheme, and garbage bytes without a token: refused before parsing
        wrong_scheme = (("authorization", "Basic old-token"),)
        assert _raw_stream(srv.address, wrong_scheme, b"").code() == grpc.StatusCode.UNAUTHENTICATED
        assert _raw_stream(srv.address, None, b"\xff\xfe garbage").code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(srv.address) as ch:  # probes need no token; discovery does
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            def services(md: tuple | None) -> list[str]:
                listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=10
                )
                return [s.name for s in next(iter(listing)).list_services_response.service]

            assert "cellserve.v1.CellServe" in services((("authorization", "Bearer new-token"),))
            with pytest.raises(grpc.RpcError) as err:
                services(None)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:  # a method nobody serves stays UNIMPLEMENTED
                ch.unary_unary("/nope.Nope/Nope")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        denied = srv.registry.get_sample_value("cellserve_errors_total", {"code": "UNAUTHENTICATED"})
        assert denied is not None and denied >= 10


def test_the_tokens_file_is_reread_when_it_changes(wait_until, running_server, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# accepted bearer tokens\nfirst\n")
    with running_server(auth_tokens_file=tokens_file) as srv:
        stub = cellserve_pb2_grpc.CellServeStub(grpc.insecure_channel(srv.address))

        def accepted(token: str) -> bool:
            try:
                stub.ListModels(cellserve_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        assert accepted("first") and not accepted("second")
        tokens_file.write_text("second, third\n")
        wait_until(lambda: accepted("second"))
        assert accepted("third") and not accepted("first")


def test_the_tokens_file_contributes_exactly_its_current_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("a\n")
    tokens = AcceptedTokens("s", path)
    assert tokens.accepts(b"a") and tokens.accepts(b"s") and not tokens.accepts(b"b")
    path.write_text("b,c\n")
    assert tokens.accepts(b"a")  # until the watcher's next poll
    tokens.poll()
    assert tokens.accepts(b"b") and tokens.accepts(b"c") and tokens.accepts(b"s") and not tokens.accepts(b"a")
    path.write_text("# all file tokens revoked\n")
    tokens.poll()
    assert tokens.accepts(b"s") and not tokens.accepts(b"b")  # removing the last one revokes it too
    path.write_text("[1, null]\n")  # does not parse (strings only): the previous list stays
    tokens.poll()
    assert tokens.accepts(b"s") and not tokens.accepts(b"None") and not tokens.accepts(b"1")
    path.unlink()  # gone (say, mid-rename): the previous list stays
    tokens.poll()
    assert tokens.accepts(b"s")
    path.write_text("d\n")
    tokens.poll()
    assert tokens.accepts(b"d")
    with pytest.raises(ValueError, match="no token"):
        AcceptedTokens(" , ", None)
    with pytest.raises(ValueError, match="strings only"):
        AcceptedTokens('["a", null]', None)


def test_a_tokens_file_that_would_block_is_never_read(tmp_path: Path) -> None:
    fifo = tmp_path / "tokens"
    fifo.write_text("a\n")
    tokens = AcceptedTokens(None, fifo)
    fifo.unlink()
    os.mkfifo(fifo)  # reading it would block for ever (like a hung secrets mount)
    tokens.poll()
    assert tokens.accepts(b"a")


def test_secrets_never_reach_the_log_or_the_help(running_server, caplog, pki, tmp_path: Path) -> None:
    secret = "tok-" + "7" * 24
    caplog.set_level(logging.DEBUG)
    f = pki.write(tmp_path)
    with running_server(auth_tokens=secret, tls_cert_file=f["server_cert"], tls_key_file=f["server_key"]) as srv:
        target = f"localhost:{srv.server.port}"
        config = ChannelConfig(tls=TLS(f["ca"]), bearer_token="wrong-" + secret)
        with Client(target, config, timeout_s=5) as client, pytest.raises(UnauthenticatedError):
            client.list_models()
        assert secret not in repr(srv.server.settings)
    key_body = pki.server.key.decode().splitlines()[1]
    assert caplog.records and secret not in caplog.text and key_body not in caplog.text
    (start,) = [r for r in caplog.records if r.getMessage() == "serving"]  # the start line says TLS and auth are on
    assert (start.tls, start.auth) == ("on", "bearer")
