"""Resume tokens: a session's state, signed, so any replica serving the same model file can continue it.

Layout, version 2 (all integers little-endian; nothing is pickled):

    offset  size     field
    0       4        magic b"CSRT"
    4       1        version (2)
    5       1        key id length k (1..64)
    6       k        key id (ASCII) — names the HMAC key that signed the token
    6+k     8        issued at, unix ms (u64)
    14+k    8        expires at, unix ms (u64)
    22+k    8        steps taken so far (u64)
    30+k    32       sha256 of the ONNX file (raw bytes)
    62+k    2        model name length n (u16)
    64+k    n        model name (UTF-8)
    64+k+n  2        state tensors m (u16), then m times:
              2        graph input name length (u16), the name (UTF-8)
              1        dtype (the native API's DType code: 1 float32, 5 float16)
              1        rank r, then r dims (u32 each): the session's shape, without the batch axis
              …        the tensor's bytes, row-major, little-endian
    end-32  32       HMAC-SHA256(key, every byte before it)

Version 1 tokens (one LSTM's h and c: layers L as u16, hidden H as u32, then h and c as float32
``[L, H]``) still resume: their two arrays are the model's two states, by position.

The state is signed, not encrypted: whoever holds a token can read the session's state (see
README, Reliability and security). The MAC is checked (constant time) before any field after the
key id is trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellserve.server.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from cellserve.server.resume_state import ResumeState
from cellserve.wire import element_count

if TYPE_CHECKING:
    from cellserve.server.settings import Settings

log = logging.getLogger(__name__)

MAGIC = b"CSRT"
VERSION = 2
READS = (1, 2)  # versions this server decodes
MAC_BYTES = 32
MAX_KEY_ID = 64  # bytes of a key id (TokenKeys enforces it when keys are loaded)
_HEAD = struct.Struct("<4sBB")  # magic, version, key id length
_TIMES = struct.Struct("<QQQ32sH")  # issued, expires, steps, sha256, name length
_DIMS = struct.Struct("<HI")  # version 1: layers, hidden
_STATE = np.dtype("<f4")
_U16 = struct.Struct("<H")
_TENSOR = struct.Struct("<BB")  # dtype code, rank
_CODES = {"float32": 1, "float16": 5}
_DTYPES = {code: np.dtype(name).newbyteorder("<") for name, code in _CODES.items()}


class TokenKeys:
    """HMAC keys by id: all of them verify, ``active`` signs (rotate by adding a key, then switching)."""

    def __init__(self, keys: dict[str, bytes], active: str) -> None:
        if active not in keys:
            raise ValueError(f"active token key {active!r} is not among the keys {sorted(keys)}")
        for kid, key in keys.items():
            if not 1 <= len(kid.encode()) <= MAX_KEY_ID or not kid.isascii():
                raise ValueError(f"token key id {kid!r} must be 1..{MAX_KEY_ID} ASCII characters")
            if len(key) < 16:
                raise ValueError(f"token key {kid!r} is shorter than 16 bytes; use 32 random bytes")
        self.keys = dict(keys)
        self.active = active

    @classmethod
    def generate(cls) -> TokenKeys:
        """One random key for this process: tokens then resume only on this process."""
        return cls({"ephemeral": secrets.token_bytes(32)}, "ephemeral")

    @classmethod
    def from_json(cls, text: str) -> TokenKeys:
        """``{"active": "k2", "keys": {"k1": "<hex>", "k2": "<hex>"}}``."""
        try:
            doc = json.loads(text)
            keys = {kid: bytes.fromhex(value) for kid, value in doc["keys"].items()}
            return cls(keys, doc["active"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f'token keys must be JSON {{"active": ID, "keys": {{ID: HEX, …}}}} with hex secrets: {e}'
            ) from e

    def to_json(self) -> str:
        """The ``from_json`` form (secret: it is how a supervisor hands its workers one shared key set)."""
        return json.dumps({"active": self.active, "keys": {kid: key.hex() for kid, key in self.keys.items()}})

    @classmethod
    def from_file(cls, path: Path) -> TokenKeys:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_settings(cls, settings: Settings, *, unset: str) -> TokenKeys:
        """``token_keys``, else ``token_keys_file``; with neither, one random key (logged with ``unset``)."""
        if settings.token_keys is not None:
            return cls.from_json(settings.token_keys.get_secret_value())
        if settings.token_keys_file is not None:
            return cls.from_file(settings.token_keys_file)
        log.warning("no token keys configured: %s", unset)
        return cls.generate()


@dataclass(frozen=True)
class TokenInfo:
    """What a decoded token says besides the state."""

    key_id: str
    issued_at_ms: int
    expires_at_ms: int


class TokenCodec:
    """Encodes session state into signed tokens and decodes them back, checking everything."""

    def __init__(self, keys: TokenKeys, ttl_s: float) -> None:
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)

    def encode(self, state: ResumeState, now_ms: int | None = None) -> tuple[bytes, int]:
        """Returns (token, expires_at_ms)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        expires = now_ms + self.ttl_ms
        kid = self.keys.active.encode()
        name = state.model.encode()
        parts = [
            _HEAD.pack(MAGIC, VERSION, len(kid)),
            kid,
            _TIMES.pack(now_ms, expires, state.steps, bytes.fromhex(state.model_sha256), len(name)),
            name,
            _U16.pack(len(state.states)),
        ]
        for tensor_name, array in zip(state.names, state.states, strict=True):
            raw_name = tensor_name.encode()
            dtype = _DTYPES[_CODES[array.dtype.name]]
            parts += [
                _U16.pack(len(raw_name)),
                raw_name,
                _TENSOR.pack(_CODES[array.dtype.name], array.ndim),
                struct.pack(f"<{array.ndim}I", *array.shape),
                np.ascontiguousarray(array, dtype=dtype).tobytes(),
            ]
        body = b"".join(parts)
        mac = hmac.new(self.keys.keys[self.keys.active], body, hashlib.sha256).digest()
        return body + mac, expires

    def decode(
        self, token: bytes, *, model: str, model_sha256: str, now_ms: int | None = None
    ) -> tuple[ResumeState, TokenInfo]:
        """Verify and unpack ``token`` for ``model``.

        Malformed → INVALID_ARGUMENT; unknown key or bad signature → UNAUTHENTICATED; expired, other
        model or other model file → FAILED_PRECONDITION.
        """
        if len(token) < _HEAD.size + MAC_BYTES or token[:4] != MAGIC:
            raise InvalidArgument("resume_token is not a cellserve resume token (bad magic or too short)")
        _, version, kid_len = _HEAD.unpack_from(token)
        if version not in READS:
            raise InvalidArgument(f"resume_token has format version {version}; this server reads versions {READS}")
        raw_kid = token[_HEAD.size : _HEAD.size + kid_len]
        if not 1 <= kid_len <= MAX_KEY_ID or len(raw_kid) != kid_len or not raw_kid.isascii():
            # Forged or truncated: the message names lengths only, never the token's bytes.
            raise InvalidArgument(
                f"resume_token is malformed: its key id length byte says {kid_len} ({len(raw_kid)} bytes follow); "
                f"a key id is 1..{MAX_KEY_ID} ASCII bytes"
            )
        kid = raw_kid.decode("ascii")
        key = self.keys.keys.get(kid)
        if key is None:
            raise Unauthenticated(
                f"resume_token was signed with a key this server does not have ({_kid_digest(raw_kid)}); "
                "configure the same token keys on every replica"
            )
        body, mac = token[:-MAC_BYTES], token[-MAC_BYTES:]
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), mac):
            raise Unauthenticated("resume_token signature does not verify: it was altered, truncated or forged")
        try:
            state, info = _unpack(body, _HEAD.size + kid_len, kid, version)
        except (struct.error, ValueError, UnicodeDecodeError) as e:  # signed but malformed: a signer bug
            raise InvalidArgument(f"resume_token is malformed: {e}") from e
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if now_ms > info.expires_at_ms:
            raise FailedPrecondition(
                f"resume_token expired {(now_ms - info.expires_at_ms) / 1000:.0f}s ago; take a fresh snapshot"
            )
        if state.model != model:
            raise FailedPrecondition(f"resume_token is for model {state.model!r}, not {model!r}; open that model")
        if state.model_sha256 != model_sha256:
            raise FailedPrecondition(
                f"resume_token was taken on model {model!r} with ONNX sha256 {state.model_sha256[:16]}…; this "
                f"server's file is {model_sha256[:16]}…, so the state would not mean the same — resume on a "
                "replica serving the same model version"
            )
        return state, info


def _kid_digest(raw_kid: bytes) -> str:
    return f"key id sha256 {hashlib.sha256(raw_kid).hexdigest()[:12]}"


def _unpack(body: bytes, offset: int, kid: str, version: int) -> tuple[ResumeState, TokenInfo]:
    issued, expires, steps, sha, name_len = _TIMES.unpack_from(body, offset)
    offset += _TIMES.size
    name = body[offset : offset + name_len].decode("utf-8")
    offset += name_len
    unpack = _states_v1 if version == 1 else _states_v2
    states, names = unpack(body, offset)
    return ResumeState(name, sha.hex(), steps, states, names), TokenInfo(kid, issued, expires)


def _states_v1(body: bytes, offset: int) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    layers, hidden = _DIMS.unpack_from(body, offset)
    offset += _DIMS.size
    count = element_count((layers, hidden), ValueError, "state")  # the one shape check, as for any client tensor
    if len(body) != offset + 2 * count * _STATE.itemsize:
        raise ValueError(f"state holds {len(body) - offset} bytes; [{layers}, {hidden}] h and c need {8 * count}")
    h = np.frombuffer(body, _STATE, count, offset).reshape(layers, hidden).astype(np.float32)
    c = np.frombuffer(body, _STATE, count, offset + 4 * count).reshape(layers, hidden).astype(np.float32)
    return (h, c), ()


def _states_v2(body: bytes, offset: int) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    (n,) = _U16.unpack_from(body, offset)
    offset += _U16.size
    states, names = [], []
    for _ in range(n):
        (name_len,) = _U16.unpack_from(body, offset)
        offset += _U16.size
        names.append(body[offset : offset + name_len].decode("utf-8"))
        offset += name_len
        code, rank = _TENSOR.unpack_from(body, offset)
        offset += _TENSOR.size
        if code not in _DTYPES:
            raise ValueError(f"state {names[-1]!r} has dtype code {code}")
        shape = struct.unpack_from(f"<{rank}I", body, offset)
        offset += 4 * rank
        dtype = _DTYPES[code]
        count = element_count(shape, ValueError, "state") if shape else 1
        if len(body) < offset + count * dtype.itemsize:
            raise ValueError(f"state {names[-1]!r} {list(shape)} runs past the token's end")
        states.append(np.frombuffer(body, dtype, count, offset).reshape(shape).astype(dtype.newbyteorder("=")))
        offset += count * dtype.itemsize
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes follow the last state")
    return tuple(states), tuple(names)
