"""Resume tokens abused on real servers (loopback, port 0): every byte flipped, cut or padded, one token resumed
twice at once, a token from other keys, an expired one, and one from another version of the same model."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from replica_helpers import open_stream, snapshot_after, token_keys

from cellserve.client import Client
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

KEYS = token_keys("3c")
OTHER_KEYS = token_keys("c3")

TOKEN_ERRORS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


def test_flipping_any_byte_of_a_resume_token_is_always_a_client_error(wait_until, running_server) -> None:
    with running_server(token_keys=KEYS) as srv, grpc.insecure_channel(srv.address) as ch:
        token = snapshot_after(ch, np.arange(5))
        assert open_stream(ch, token)[0] == grpc.StatusCode.OK
        seen: dict[grpc.StatusCode, int] = {}
        for i in range(len(token)):
            for bit in (0x01, 0x80):
                bad = bytearray(token)
                bad[i] ^= bit
                code, _ = open_stream(ch, bytes(bad))
                assert code in TOKEN_ERRORS, (i, bit, code)
                seen[code] = seen.get(code, 0) + 1
        for cut in (1, 31, 32, 33, len(token) - 1):
            assert open_stream(ch, token[:-cut])[0] in TOKEN_ERRORS
            assert open_stream(ch, token + b"\x00" * cut)[0] in TOKEN_ERRORS
        assert seen.get(grpc.StatusCode.UNAUTHENTICATED) and seen.get(grpc.StatusCode.INVALID_ARGUMENT)
        wait_until(lambda: not srv.server.sessions.sessions)
        assert srv.server.models.get("tiny").pool.used == 0


def test_one_token_resumes_twice_concurrently_into_two_independent_sessions(running_server, tiny_oracle) -> None:
    """Tokens are bearer capabilities, not single-use: a token forks the session (documented behaviour)."""
    tokens = np.random.default_rng(8).integers(0, 256, size=12, dtype=np.int64)
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        with grpc.insecure_channel(a.address) as ch:
            token = snapshot_after(ch, tokens[:6])
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
        token = snapshot_after(ch_a, np.arange(3))
        assert open_stream(ch_other, token)[0] == grpc.StatusCode.UNAUTHENTICATED  # same key id, other secret
        wait_until(lambda: open_stream(ch_a, token)[0] != grpc.StatusCode.OK, timeout_s=10)
        assert open_stream(ch_a, token)[0] == grpc.StatusCode.FAILED_PRECONDITION


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
        token = snapshot_after(ch_a, np.arange(4))
        call = pb_grpc.CellServeStub(ch_b).Stream(
            iter([pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token))]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "same model version" in err.value.details()
        assert not b.server.sessions.sessions

