"""``cellserve.v1.Tensor`` → numpy with precise errors for malformed tensors, and outputs → wire bytes.

The decoding itself, and encoding any array as a ``Tensor`` (what clients and tests send), are
``cellserve.wire``'s, shared with the client.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from cellserve.server.errors import InvalidArgument
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.wire import to_numpy as decode


def to_numpy(t: pb.Tensor) -> np.ndarray:
    """Decode a request's Tensor; INVALID_ARGUMENT if its dtype, shape or byte length is inconsistent."""
    return decode(t, InvalidArgument)


_F32 = np.dtype("<f4")


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:  # two bytes: sequence numbers and the length of a typical output
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_BYTE = [bytes((i,)) for i in range(0x80)]


def encode_output(seq: int, y: np.ndarray, resume_token: bytes = b"") -> bytes:
    """``StreamResponse{output{seq, output: y, resume_token}}`` serialized, for the per-message hot path.

    The same bytes as ``StreamResponse(output=Output(seq=seq, output=output_tensor(y),
    resume_token=resume_token)).SerializeToString()`` (tests/unit/test_tensors.py checks it), at a
    fraction of the cost of building three protobuf messages. Wire format: a field's tag is
    ``(number << 3) | type``, type 0 a varint and 2 length-delimited; proto3 leaves out zero values;
    ``Tensor.shape`` is packed. The part that depends only on y's shape is built once per shape.
    """
    raw = y.astype(_F32, copy=False).tobytes()
    tensor = _tensor_prefix(y.shape)  # Output.output's tag, length and Tensor up to raw's bytes
    token = b"\x1a" + _varint(len(resume_token)) + resume_token if resume_token else b""
    seq_field = b"\x08" + _varint(seq) if seq else b""
    length = len(seq_field) + len(tensor) + len(raw) + len(token)
    return b"".join((b"\x12", _varint(length), seq_field, tensor, raw, token))


def encode_sessions_output(seq: int, y: np.ndarray) -> bytes:
    """``MultiplexResponse{seq, output{output: y}}`` serialized (a gateway's answer with no failed entry and no
    tokens), byte-identical to protobuf's, as ``encode_output`` is: ``seq`` is field 1, ``output`` field 3, and the
    tensor is ``SessionsOutput``'s field 1."""
    raw = y.astype(_F32, copy=False).tobytes()
    tensor = b"\x0a" + _tensor_prefix(y.shape)[1:]  # the same Tensor, as SessionsOutput.output (field 1)
    body_length = len(tensor) + len(raw)
    seq_field = b"\x08" + _varint(seq) if seq else b""
    return b"".join((seq_field, b"\x1a", _varint(body_length), tensor, raw))


@functools.lru_cache(maxsize=256)
def _tensor_prefix(shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_varint(d) for d in shape)
    nbytes = 4 * math.prod(shape)
    body = b"\x08\x01\x12" + _varint(len(dims)) + dims + b"\x1a" + _varint(nbytes)  # dtype 1 = FLOAT32
    return b"\x12" + _varint(len(body) + nbytes) + body
