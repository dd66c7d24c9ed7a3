"""Hostile checks of issue 8's promises on real servers (loopback, port 0): bearer auth on every service
(header variants, empty token lists), TLS / mutual TLS edge cases and file rotation under open streams,
resume tokens bit-flipped / replayed / expired / from another model version, SDK resume when every other
server is gone and across mTLS + bearer servers, and SIGTERM while 50 sessions are stepping.

The first tests pin behaviour a hostile tester confirmed to be right; the last ones reproduce bugs it found (fixed).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellserve.client import TLS, AsyncClient, ChannelConfig, Client, DataLossError, UnavailableError
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

KEYS = '{"active": "k1", "keys": {"k1": "' + "3c" * 32 + '"}}'
OTHER_KEYS = '{"active": "k1", "keys": {"k1": "' + "c3" * 32 + '"}}'
GOOD = "good-token"
TOKEN_ERRORS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


def _open(channel: grpc.Channel, token: bytes = b"", metadata: tuple = ()) -> tuple[grpc.StatusCode, list]:
    """Open a session (optionally resuming), then half-close; returns (status, responses)."""
    call = pb_grpc.CellServeStub(channel).Stream(
        iter([pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token))]), metadata=metadata, timeout=10
    )
    try:
        return grpc.StatusCode.OK, list(call)
    except grpc.RpcError as e:
        return e.code(), []


def _snapshot_after(channel: grpc.Channel, tokens: np.ndarray) -> bytes:
    """A token of a session that ran ``tokens``."""
    x = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[len(tokens)], raw=np.asarray(tokens, "<i8").tobytes())
    reqs = [
        pb.StreamRequest(open=pb.Open(model="tiny")),
        pb.StreamRequest(step=pb.Step(seq=0, input=x)),
        pb.StreamRequest(snapshot=pb.Snapshot()),
    ]
    responses = list(pb_grpc.CellServeStub(channel).Stream(iter(reqs), timeout=10))
    (snap,) = [r.snapshot for r in responses if r.WhichOneof("kind") == "snapshot"]
    assert snap.steps == len(tokens)
    return snap.token


# -- bearer tokens ---------------------------------------------------------------------------------


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
            assert _open(ch, metadata=metadata)[0] == code, metadata  # the stream is gated the same way


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


# -- TLS and mutual TLS ----------------------------------------------------------------------------


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


def _health(target: str, tls: TLS | None) -> str:
    with Client(target, ChannelConfig(tls=tls), timeout_s=5) as client:
        return client.health()


def test_mutual_tls_refuses_plaintext_wrong_name_and_out_of_date_client_certificates(running_server, pki, tmp_path):
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    with running_server(**settings) as srv:
        target = f"localhost:{srv.server.port}"
        good = TLS(f["ca"], pki.client.cert, pki.client.key)
        assert _health(target, good) == "SERVING"
        assert _health(f"127.0.0.1:{srv.server.port}", good) == "SERVING"  # the IP SAN matches too
        expired = _leaf(pki.ca, "expired", valid_from_days=-10, valid_to_days=-1)
        not_yet = _leaf(pki.ca, "not-yet", valid_from_days=1, valid_to_days=3)
        wrong_name = TLS(f["ca"], pki.client.cert, pki.client.key, server_name="not-the-server.example")
        for bad in (None, wrong_name, TLS(f["ca"], *expired), TLS(f["ca"], *not_yet)):
            with pytest.raises(UnavailableError):
                _health(target, bad)


def test_broken_or_missing_tls_files_keep_the_old_pair_and_open_streams_go_on(running_server, pki, tmp_path, caplog):
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    good = TLS(pki.ca.pem, pki.client.cert, pki.client.key)  # bytes: the CA file is broken below
    with running_server(**settings) as srv, Client(f"localhost:{srv.server.port}", ChannelConfig(tls=good)) as client:
        target = f"localhost:{srv.server.port}"
        tokens = np.arange(20, dtype=np.int64) * 7 % 256
        ys = []
        with client.session("tiny") as s:
            ys.append(s.step(tokens[:2]))
            breakages = [
                lambda: f["server_cert"].unlink(),
                lambda: f["server_cert"].write_bytes(b"garbage"),
                lambda: f["server_cert"].write_bytes(b""),
                lambda: (f["server_cert"].write_bytes(pki.server.cert), f["ca"].write_bytes(b"")),
                lambda: f["ca"].write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                lambda: f["ca"].unlink(),
                lambda: (f["ca"].write_bytes(pki.ca.pem), f["server_key"].unlink(), f["server_key"].mkdir()),
            ]
            for i, breakage in enumerate(breakages):
                caplog.clear()
                breakage()
                srv.server.tls.poll()  # the watcher thread's check, without waiting for it
                assert _health(target, good) == "SERVING"  # new connections: the old pair still
                assert "keeping the previous ones" in caplog.text
                ys.append(s.step(tokens[2 + 2 * i : 4 + 2 * i]))  # the open stream goes on
            assert srv.server.tls.reloads == 0
            f["server_key"].rmdir()
            f["server_key"].write_bytes(pki.server.key)  # a good file later is picked up
            srv.server.tls.poll()
            assert _health(target, good) == "SERVING"
            assert srv.server.tls.reloads == 1
            ys.append(s.step(tokens[16:]))
        np.testing.assert_array_equal(np.concatenate(ys).shape, (20, 256))


def test_rotating_to_another_ca_moves_new_connections_and_keeps_open_streams(
    running_server, pki, tmp_path, tiny_oracle
):
    f = pki.write(tmp_path)
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "tls_client_ca_file": f["ca"]}
    old = TLS(f["ca"], pki.client.cert, pki.client.key)
    tokens = np.arange(12, dtype=np.int64)
    with running_server(**settings) as srv, Client(f"localhost:{srv.server.port}", ChannelConfig(tls=old)) as client:
        target = f"localhost:{srv.server.port}"
        with client.session("tiny") as s:
            ys = [s.step(tokens[:6])]
            server = pki.other_ca.issue("localhost")
            f["server_key"].write_bytes(server.key)
            f["server_cert"].write_bytes(server.cert)
            f["ca"].write_bytes(pki.other_ca.pem)
            srv.server.tls.poll()
            new = TLS(pki.other_ca.pem, pki.other_client.cert, pki.other_client.key)
            assert _health(target, new) == "SERVING"
            with pytest.raises(UnavailableError):
                _health(target, old)
            ys.append(s.step(tokens[6:]))  # the stream opened under the old pair is untouched
        np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


# -- resume tokens ---------------------------------------------------------------------------------


def test_flipping_any_byte_of_a_resume_token_is_always_a_client_error(wait_until, running_server) -> None:
    with running_server(token_keys=KEYS) as srv, grpc.insecure_channel(srv.address) as ch:
        token = _snapshot_after(ch, np.arange(5))
        assert _open(ch, token)[0] == grpc.StatusCode.OK
        seen: dict[grpc.StatusCode, int] = {}
        for i in range(len(token)):
            for bit in (0x01, 0x80):
                bad = bytearray(token)
                bad[i] ^= bit
                code, _ = _open(ch, bytes(bad))
                assert code in TOKEN_ERRORS, (i, bit, code)
                seen[code] = seen.get(code, 0) + 1
        for cut in (1, 31, 32, 33, len(token) - 1):
            assert _open(ch, token[:-cut])[0] in TOKEN_ERRORS
            assert _open(ch, token + b"\x00" * cut)[0] in TOKEN_ERRORS
        assert seen.get(grpc.StatusCode.UNAUTHENTICATED) and seen.get(grpc.StatusCode.INVALID_ARGUMENT)
        wait_until(lambda: not srv.server.sessions.sessions)
        assert srv.server.models.get("tiny").pool.used == 0


def test_one_token_resumes_twice_concurrently_into_two_independent_sessions(running_server, tiny_oracle) -> None:
    """Tokens are bearer capabilities, not single-use: a token forks the session (documented behaviour)."""
    tokens = np.random.default_rng(8).integers(0, 256, size=12, dtype=np.int64)
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        with grpc.insecure_channel(a.address) as ch:
            token = _snapshot_after(ch, tokens[:6])
        with (
            Client(a.address) as ca,
            Client(b.address) as cb,
            ca.session("tiny", resume_token=token) as s1,
            cb.session("tiny", resume_token=token) as s2,
        ):
            assert s1.steps == s2.steps == 6
            y1 = s1.step(tokens[6:9])
            y2 = s2.step(tokens[6:])
        want = tiny_oracle.sequence(tokens)[6:]
        np.testing.assert_allclose(y1, want[:3], atol=1e-5, rtol=0)
        np.testing.assert_allclose(y2, want, atol=1e-5, rtol=0)


def test_a_token_from_other_keys_is_unauthenticated_and_an_expired_one_failed_precondition(
    wait_until, running_server
) -> None:
    with (
        running_server(token_keys=KEYS, token_ttl_s=1) as a,
        running_server(token_keys=OTHER_KEYS) as other,
        grpc.insecure_channel(a.address) as ch_a,
        grpc.insecure_channel(other.address) as ch_other,
    ):
        token = _snapshot_after(ch_a, np.arange(3))
        assert _open(ch_other, token)[0] == grpc.StatusCode.UNAUTHENTICATED  # same key id, other secret
        wait_until(lambda: _open(ch_a, token)[0] != grpc.StatusCode.OK, timeout_s=10)
        assert _open(ch_a, token)[0] == grpc.StatusCode.FAILED_PRECONDITION


# -- SDK transparent resume ------------------------------------------------------------------------


def test_sync_session_whose_every_server_is_gone_raises_unavailable(running_server) -> None:
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address], resume_timeout_s=2) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        s.snapshot()
        b.call(b.server.stop(0))
        a.call(a.server.stop(0))
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="no server took the session within 2 s"):
            s.step([3])
        assert time.monotonic() - start < 20


def test_async_session_whose_every_server_is_gone_raises_unavailable(running_server) -> None:
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> None:
            async with AsyncClient([a.address, b.address], resume_timeout_s=2) as client, client.session("tiny") as s:
                await s.step([1, 2])
                await s.snapshot()
                b.call(b.server.stop(0))
                a.call(a.server.stop(0))
                with pytest.raises(UnavailableError, match="no server took the session within 2 s"):
                    await asyncio.wait_for(s.step([3]), 20)

        asyncio.run(main())


def test_resume_refuses_an_expired_snapshot_instead_of_continuing_wrongly(wait_until, running_server) -> None:
    with (
        running_server(token_keys=KEYS, token_ttl_s=1) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address], resume_timeout_s=2) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        token = s.snapshot()
        with grpc.insecure_channel(b.address) as ch:
            wait_until(lambda: _open(ch, token)[0] != grpc.StatusCode.OK, timeout_s=10)
        a.call(a.server.stop(0))
        with pytest.raises(DataLossError, match="expired"):  # every other server refused the token: final
            s.step([3])
        assert not b.server.sessions.sessions


# -- drain of a real process -----------------------------------------------------------------------


def test_sigterm_while_50_sessions_step_from_several_threads(spawn_server, running_server, tiny_oracle) -> None:
    """Every session either finishes or is told `draining` with a current token; the process exits 0."""
    threads, per_thread, length = 5, 10, 200  # long enough that SIGTERM always lands mid-run
    grace = 15
    a = spawn_server("--token-keys", KEYS, "--grace-s", str(grace), "--capacity", "64")
    rng = np.random.default_rng(9)
    seqs = [rng.integers(0, 256, size=length, dtype=np.int64) for _ in range(threads * per_thread)]
    results: dict[int, tuple[np.ndarray, int, bytes, bool]] = {}  # i -> (outputs, steps, token, finished)
    started = threading.Barrier(threads + 1, timeout=60)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with Client(a.address) as client:
                ids = list(range(w * per_thread, (w + 1) * per_thread))
                sessions = {i: client.session("tiny") for i in ids}
                outs: dict[int, list[np.ndarray]] = {i: [] for i in ids}
                for i in ids:
                    outs[i].append(sessions[i].step(seqs[i][:1]))
                started.wait()
                live = set(ids)
                while live:
                    for i in sorted(live):
                        s = sessions[i]
                        n = s.steps
                        if s.draining or n == length:
                            results[i] = (np.concatenate(outs[i]), n, s.resume_token, n == length)
                            s.close()
                            live.discard(i)
                            continue
                        outs[i].append(s.step(seqs[i][n : n + 1]))
        except BaseException as e:
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    started.wait()
    a.proc.send_signal(signal.SIGTERM)
    for t in pool:
        t.join(60)
    assert not errors, errors
    sent = time.monotonic()
    assert a.proc.wait(timeout=grace + 10) == 0
    assert time.monotonic() - sent < grace + 10
    assert len(results) == threads * per_thread
    drained = [i for i, r in results.items() if not r[3]]
    assert drained  # SIGTERM came while they were stepping
    with running_server(token_keys=KEYS) as b, Client(b.address) as client:
        for i, (got, steps, token, finished) in results.items():
            want = tiny_oracle.sequence(seqs[i])
            np.testing.assert_allclose(got, want[:steps], atol=1e-5, rtol=0)
            if finished:
                continue
            assert token
            with client.session("tiny", resume_token=token) as s:
                # current as of every request the server read before it: at most the one step sent after
                k = s.steps
                assert steps - 1 <= k <= steps, (steps, k)
                np.testing.assert_allclose(s.step(seqs[i][k:]), want[k:], atol=1e-5, rtol=0)


def test_a_session_moves_on_drain_between_mutual_tls_servers_with_bearer_auth(
    running_server, pki, tmp_path, tiny_oracle
) -> None:
    """The SDK's transparent resume reuses the whole channel config (TLS, client cert, token) for B."""
    f = pki.write(tmp_path)
    secure = {
        "tls_cert_file": f["server_cert"],
        "tls_key_file": f["server_key"],
        "tls_client_ca_file": f["ca"],
        "auth_tokens": GOOD,
        "token_keys": KEYS,
    }
    config = ChannelConfig(tls=TLS(pki.ca.pem, pki.client.cert, pki.client.key), bearer_token=GOOD)
    tokens = np.random.default_rng(10).integers(0, 256, size=24, dtype=np.int64)
    with running_server(**secure) as a, running_server(**secure) as b:
        targets = [f"localhost:{a.server.port}", f"localhost:{b.server.port}"]
        with Client(targets, config) as client, client.session("tiny") as s:
            ys = [s.step(tokens[:8])]
            drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
            ys.append(s.step(tokens[8:16]))  # answered by A, then moved
            ys.append(s.step(tokens[16:]))  # answered by B
            assert b.server.sessions.sessions and s.steps == 24
            drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_a_token_is_refused_by_a_replica_serving_another_version_of_the_same_model(running_server, tmp_path) -> None:
    """Rolling update to new weights under the same name: the state would not mean the same there."""
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path / "v2", name="tiny", layers=2, hidden=32, seed=1)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(model_dirs=[tmp_path / "v2"], token_keys=KEYS) as b,
        grpc.insecure_channel(a.address) as ch_a,
        grpc.insecure_channel(b.address) as ch_b,
    ):
        token = _snapshot_after(ch_a, np.arange(4))
        call = pb_grpc.CellServeStub(ch_b).Stream(
            iter([pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token))]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "same model version" in err.value.details()
        assert not b.server.sessions.sessions


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


# -- found by hostile testing, fixed since ------------------------------------------------------


def test_drain_with_a_live_oip_sequence_still_tells_every_native_session_and_exits_0(spawn_server):
    a = spawn_server("--token-keys", KEYS, "--grace-s", "10")

    async def main() -> list[str]:
        async with grpc.aio.insecure_channel(a.address) as ch:
            before = pb_grpc.CellServeStub(ch).Stream()
            await before.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            await before.read()
            seq = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
            req = oip.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="x", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend([1, 2, 3])
            req.parameters["sequence_id"].int64_param = 42
            req.parameters["sequence_start"].bool_param = True
            await seq.write(req)
            assert not (await seq.read()).error_message
            after = pb_grpc.CellServeStub(ch).Stream()
            await after.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            await after.read()
            a.proc.send_signal(signal.SIGTERM)
            kinds = []
            for call in (before, after):
                try:
                    kinds.append((await asyncio.wait_for(call.read(), 20)).WhichOneof("kind"))
                except grpc.aio.AioRpcError as e:
                    kinds.append(e.code().name)
            for call in (before, after, seq):
                call.cancel()
            return kinds

    kinds = asyncio.run(main())
    assert kinds == ["draining", "draining"]
    assert a.proc.wait(timeout=30) == 0


def test_async_session_idle_through_a_whole_drain_resumes_on_the_next_target(running_server, tiny_oracle):
    tokens = np.arange(8, dtype=np.int64) * 11 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> np.ndarray:
            async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                y0 = await s.step(tokens[:5])
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(a.server.drain(0.5), a.loop))
                y1 = await s.step(tokens[5:])
                assert s.steps == 8 and b.server.sessions.sessions
                return np.concatenate([y0, y1])

        ys = asyncio.run(main())
    np.testing.assert_allclose(ys, tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_tokens_removed_from_the_file_are_refused_by_a_running_server(wait_until, running_server, tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("leaked-token\n")
    with (
        running_server(auth_tokens="ops-secret", auth_tokens_file=path) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb_grpc.CellServeStub(ch)

        def accepted(token: str) -> bool:
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        assert accepted("leaked-token")
        path.write_text("")
        wait_until(lambda: not accepted("leaked-token"))  # the watcher re-reads the file within a second
        assert accepted("ops-secret")


def test_sync_session_moved_by_a_drain_keeps_its_idle_timeout(running_server):
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address]) as client,
        client.session("tiny", idle_timeout_s=1000) as s,
    ):
        s.step([1, 2, 3])
        assert s.idle_timeout_s == 1000
        asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
        s.step([4])
        s.step([5])  # on B now
        assert b.server.sessions.sessions
        assert s.idle_timeout_s == 1000
        assert next(iter(b.server.sessions.sessions.values())).idle_timeout_s == 1000


def test_async_session_moved_by_a_drain_keeps_its_idle_timeout(running_server):
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> None:
            async with (
                AsyncClient([a.address, b.address]) as client,
                await client.session("tiny", idle_timeout_s=1000) as s,
            ):
                await s.step([1, 2, 3])
                drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
                await s.step([4])
                await s.step([5])
                await asyncio.wrap_future(drained)
                assert s.idle_timeout_s == 1000

        asyncio.run(main())


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_move_that_finds_no_taker_keeps_the_session_on_the_draining_server(running_server, tiny_oracle, api):
    tokens = np.arange(6, dtype=np.int64) * 5 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        b.call(b.server.stop(0))  # the only other replica is already gone

        def drain_a() -> object:
            return asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)

        if api == "sync":
            with Client([a.address, b.address]) as client, client.session("tiny") as s:
                ys = [s.step(tokens[:3])]
                drained = drain_a()
                ys.append(s.step(tokens[3:4]))
                ys.append(s.step(tokens[4:]))  # A still serves it during its grace
        else:

            async def main() -> list[np.ndarray]:
                async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                    ys = [await s.step(tokens[:3])]
                    nonlocal drained
                    drained = drain_a()
                    ys.append(await s.step(tokens[3:4]))
                    ys.append(await s.step(tokens[4:]))
                    return ys

            drained = None
            ys = asyncio.run(main())
        drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_secret_files_that_would_block_are_never_read(running_server, pki, tmp_path):
    """A FIFO (like a hung secrets mount) in place of the key or tokens file: the check skips it, serving goes on."""
    f = pki.write(tmp_path)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("tok\n")
    settings = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "auth_tokens_file": tokens_file}
    with running_server(**settings) as srv:
        for path in (f["server_key"], tokens_file):
            path.unlink()
            os.mkfifo(path)
        srv.server.tls.poll()
        srv.server.auth_tokens.poll()
        config = ChannelConfig(tls=TLS(pki.ca.pem), bearer_token="tok")
        with Client(f"localhost:{srv.server.port}", config, timeout_s=10) as client:
            assert [m.name for m in client.list_models()] == ["tiny"]


@pytest.mark.parametrize("api", ["sync", "async"])
def test_new_sessions_open_on_the_next_target_when_the_first_is_draining_or_gone(running_server, api):
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        asyncio.run_coroutine_threadsafe(a.server.drain(5), a.loop).result(30)  # A drained and stopped
        if api == "sync":
            with Client([a.address, b.address]) as client, client.session("tiny") as s:
                assert s.step([1]).shape == (1, 256)
        else:

            async def main() -> None:
                async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                    assert (await s.step([1])).shape == (1, 256)

            asyncio.run(main())
        assert not b.server.sessions.sessions


def test_a_session_stays_on_its_draining_server_when_the_other_serves_new_weights(
    running_server, tmp_path, tiny_oracle
) -> None:
    """Rolling update to new weights: B refuses the token (FAILED_PRECONDITION), so the SDK keeps the session
    on A for A's grace period instead of losing it; outputs stay exact."""
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path / "v2", name="tiny", layers=2, hidden=32, seed=1)
    tokens = np.arange(9, dtype=np.int64) * 13 % 256
    with (
        running_server(token_keys=KEYS) as a,
        running_server(model_dirs=[tmp_path / "v2"], token_keys=KEYS) as b,
        Client([a.address, b.address]) as client,
        client.session("tiny") as s,
    ):
        ys = [s.step(tokens[:3])]
        drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
        ys += [s.step(tokens[3:6]), s.step(tokens[6:])]  # each step after `draining` tries B, which refuses
        assert s.draining and a.server.sessions.sessions and not b.server.sessions.sessions
        s.close()
        drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)
