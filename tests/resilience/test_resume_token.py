"""Resume tokens: exact round trip, and every way a token can be wrong gets its precise error."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from token_helpers import v1_token

from cellserve.server.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from cellserve.server.resume_state import ResumeState
from cellserve.server.resume_token import MAGIC, TokenCodec, TokenKeys

SHA = "ab" * 32
KEYS = TokenKeys({"k1": b"1" * 32, "k2": b"2" * 32}, "k2")


def state(seed: int = 0) -> ResumeState:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((2, 8)).astype(np.float32)
    c = rng.standard_normal((2, 8)).astype(np.float32)
    return ResumeState("tiny", SHA, 123, (h, c), ("h0", "c0"))


def decode(codec: TokenCodec, token: bytes, **kw):
    args = {"model": "tiny", "model_sha256": SHA, "now_ms": 2_000} | kw
    return codec.decode(token, **args)


def test_round_trip_is_bit_identical():
    codec = TokenCodec(KEYS, ttl_s=10)
    s = state()
    token, expires = codec.encode(s, now_ms=1_000)
    got, info = decode(codec, token)
    assert expires == 11_000 and info.expires_at_ms == 11_000 and info.key_id == "k2"
    assert got.steps == 123 and got.model == "tiny" and got.model_sha256 == SHA
    assert got.names == ("h0", "c0") and len(got.states) == 2
    for mine, back in zip(s.states, got.states, strict=True):
        assert back.dtype == mine.dtype and back.shape == mine.shape and back.tobytes() == mine.tobytes()
    assert token.startswith(MAGIC) and token[4] == 2  # version 2


def test_states_of_different_shapes_and_dtypes_round_trip_bit_identically_by_name():
    rng = np.random.default_rng(5)
    states = (
        rng.standard_normal((2, 8)).astype(np.float32),  # h of [L, B, H]
        rng.standard_normal((3, 4, 5)).astype(np.float16),  # a float16 cache [B, 3, 4, 5]
        np.array([-0.0, np.inf, -np.inf, 65504, 6e-8], np.float16),  # float16's edges survive
        np.array(1.5, np.float32),  # a state of shape [B]: one scalar per session
        rng.standard_normal((1, 1, 1, 7)).astype(np.float32),
    )
    names = ("h", "conv_cache", "edges", "gain", "stacked ünï")
    s = ResumeState("tiny", SHA, 7, states, names)
    codec = TokenCodec(KEYS, ttl_s=10)
    got, _ = decode(codec, codec.encode(s, now_ms=1_000)[0])
    assert got.names == names and got.steps == 7
    assert len(got.states) == len(states)
    for mine, back in zip(states, got.states, strict=True):
        assert back.dtype == mine.dtype and back.shape == mine.shape
        assert back.tobytes() == mine.tobytes()  # bit-identical, -0.0 and infinities too
        assert back.dtype.byteorder in ("=", "|") and back.flags.writeable  # native order, an array of its own


def test_a_version_1_token_still_decodes_to_h_and_c_by_position():
    rng = np.random.default_rng(6)
    h, c = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)
    token = v1_token("k1", b"1" * 32, model="tiny", sha256=SHA, steps=99, h=h, c=c, issued_ms=1_000,
                     expires_ms=11_000)  # fmt: skip
    got, info = decode(TokenCodec(KEYS, ttl_s=10), token)
    assert (got.model, got.model_sha256, got.steps, got.names) == ("tiny", SHA, 99, ())
    assert info.key_id == "k1" and info.issued_at_ms == 1_000 and info.expires_at_ms == 11_000
    assert len(got.states) == 2
    for mine, back in zip((h, c), got.states, strict=True):
        assert back.dtype == np.float32 and back.shape == (2, 8) and back.tobytes() == mine.tobytes()
    with pytest.raises(Unauthenticated, match="signature"):  # a version-1 token is checked like any other
        decode(TokenCodec(KEYS, ttl_s=10), token[:-1] + bytes((token[-1] ^ 1,)))
    with pytest.raises(FailedPrecondition, match="expired"):
        decode(TokenCodec(KEYS, ttl_s=10), token, now_ms=12_000)


def test_rotation_old_key_still_verifies_new_key_signs():
    old = TokenCodec(TokenKeys({"k1": b"1" * 32}, "k1"), ttl_s=10)
    token, _ = old.encode(state(), now_ms=1_000)
    rotated = TokenCodec(KEYS, ttl_s=10)
    assert decode(rotated, token)[1].key_id == "k1"
    assert decode(rotated, rotated.encode(state(), now_ms=1_000)[0])[1].key_id == "k2"


@pytest.mark.parametrize("position", [10, 60, 100, -40, -1])
def test_any_flipped_byte_is_unauthenticated_or_invalid(position):
    codec = TokenCodec(KEYS, ttl_s=10)
    token = bytearray(codec.encode(state(), now_ms=1_000)[0])
    token[position] ^= 0x01
    with pytest.raises((Unauthenticated, InvalidArgument)):
        decode(codec, bytes(token))


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda t: t[:-5], Unauthenticated, "signature"),
        (lambda t: t[:60], Unauthenticated, "signature"),
        (lambda t: t[:3], InvalidArgument, "not a cellserve resume token"),
        (lambda t: b"XXXX" + t[4:], InvalidArgument, "bad magic"),
        (lambda t: t[:4] + b"\x09" + t[5:], InvalidArgument, "version 9"),
        (lambda t: b"", InvalidArgument, "too short"),
    ],
    ids=["truncated-mac", "truncated-body", "tiny", "magic", "version", "empty"],
)
def test_malformed_tokens(mutate, error, words):
    codec = TokenCodec(KEYS, ttl_s=10)
    token = codec.encode(state(), now_ms=1_000)[0]
    with pytest.raises(error, match=words):
        decode(codec, mutate(token))


def test_forged_with_another_key_under_a_known_id_is_unauthenticated():
    forger = TokenCodec(TokenKeys({"k2": b"x" * 32}, "k2"), ttl_s=10)
    token = forger.encode(state(), now_ms=1_000)[0]
    with pytest.raises(Unauthenticated, match="forged"):
        decode(TokenCodec(KEYS, ttl_s=10), token)


def test_unknown_key_id_is_unauthenticated():
    other = TokenCodec(TokenKeys({"k9": b"9" * 32}, "k9"), ttl_s=10)
    with pytest.raises(Unauthenticated, match="key id sha256 " + hashlib.sha256(b"k9").hexdigest()[:12]) as e:
        decode(TokenCodec(KEYS, ttl_s=10), other.encode(state(), now_ms=1_000)[0])
    assert "k9" not in e.value.message  # named by a digest: no token bytes are echoed


def test_expired_wrong_model_and_wrong_file_are_failed_precondition():
    codec = TokenCodec(KEYS, ttl_s=10)
    token = codec.encode(state(), now_ms=1_000)[0]
    with pytest.raises(FailedPrecondition, match="expired"):
        decode(codec, token, now_ms=12_000)
    with pytest.raises(FailedPrecondition, match="'other'"):
        decode(codec, token, model="other")
    with pytest.raises(FailedPrecondition, match="same model version"):
        decode(codec, token, model_sha256="cd" * 32)


def test_key_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="active token key"):
        TokenKeys({"a": b"1" * 32}, "b")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        TokenKeys({"a": b"1"}, "a")
    with pytest.raises(ValueError, match="hex secrets"):
        TokenKeys.from_json('{"active": "a", "keys": {"a": "not-hex"}}')
    keys = TokenKeys.from_json('{"active": "a", "keys": {"a": "' + "00" * 32 + '"}}')
    assert keys.active == "a" and keys.keys["a"] == bytes(32)
