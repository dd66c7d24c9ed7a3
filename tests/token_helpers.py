"""Resume tokens built by hand, byte by byte, independent of the codec (server/resume_token.py)."""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np


def v1_token(
    kid: str, key: bytes, *, model: str, sha256: str, steps: int, h: np.ndarray, c: np.ndarray,
    issued_ms: int, expires_ms: int,
) -> bytes:  # fmt: skip
    """A version-1 token (one LSTM's h and c, float32 ``[L, H]``), laid out as the version-1 format says:
    magic, version 1, key id, issued/expires/steps (u64), sha256, model name (u16 length), layers (u16),
    hidden (u32), h and c as little-endian float32, then HMAC-SHA256 of every byte before it."""
    layers, hidden = h.shape
    assert c.shape == h.shape
    raw_kid, name = kid.encode(), model.encode()
    body = b"".join(
        [
            b"CSRT",
            bytes((1, len(raw_kid))),
            raw_kid,
            struct.pack("<QQQ", issued_ms, expires_ms, steps),
            bytes.fromhex(sha256),
            struct.pack("<H", len(name)),
            name,
            struct.pack("<HI", layers, hidden),
            np.ascontiguousarray(h, "<f4").tobytes(),
            np.ascontiguousarray(c, "<f4").tobytes(),
        ]
    )
    return body + hmac.new(key, body, hashlib.sha256).digest()
