"""``cellserve.v1.Tensor`` ↔ numpy, with precise errors for malformed tensors."""

from __future__ import annotations

import math

import numpy as np

from cellserve.server.errors import InvalidArgument
from cellserve.v1 import cellserve_pb2 as pb

DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}
PB_DTYPES: dict[str, int] = {dt.name: code for code, dt in DTYPES.items()}
NATIVE: dict[int, np.dtype] = {code: dt.newbyteorder("=") for code, dt in DTYPES.items()}  # decoded arrays
LITTLE: dict[str, np.dtype] = {dt.name: dt for dt in DTYPES.values()}  # what the wire carries


def to_numpy(t: pb.Tensor) -> np.ndarray:
    """Decode a Tensor; INVALID_ARGUMENT if its dtype, shape or byte length is inconsistent (per message: lean)."""
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidArgument(f"tensor dtype {t.dtype} is not supported; use one of {sorted(PB_DTYPES)}")
    shape = tuple(t.shape)  # Python ints already
    if not shape:
        raise InvalidArgument("tensor has no shape; give its dimensions, e.g. [T] for T token ids")
    count = math.prod(shape)
    if count <= 0:
        if min(shape) < 0:
            raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
        raise InvalidArgument(f"tensor shape {list(shape)} is empty; a step needs at least one element")
    if min(shape) < 0:  # two negative dimensions multiply to a positive count
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    raw = t.raw  # each access of a bytes field makes a new bytes object: once
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"tensor raw has {len(raw)} bytes; shape {list(shape)} of {dtype.name} needs {count * dtype.itemsize}"
        )
    a = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return a if dtype.isnative else a.astype(NATIVE[t.dtype])


_F32 = np.dtype("<f4")


def output_tensor(y: np.ndarray) -> pb.Tensor:
    """A step's float32 output ``[T, O]`` as a Tensor: ``to_proto`` without its dtype lookups (per message)."""
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=y.shape, raw=y.astype(_F32, copy=False).tobytes())


def to_proto(a: np.ndarray) -> pb.Tensor:
    """Encode a numpy array as raw little-endian bytes."""
    a = np.ascontiguousarray(a)
    code = PB_DTYPES.get(a.dtype.name)
    if code is None:
        raise TypeError(f"dtype {a.dtype} has no Tensor encoding")
    return pb.Tensor(dtype=code, shape=a.shape, raw=a.astype(LITTLE[a.dtype.name], copy=False).tobytes())
