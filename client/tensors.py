"""numpy ↔ ``cellserve.v1.Tensor`` (raw little-endian bytes) on the client side."""

from __future__ import annotations

import numpy as np

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.wire import DTYPES, to_proto

__all__ = ["to_numpy", "to_proto"]  # to_proto: the encoding the server shares (cellserve.wire)


def to_numpy(t: pb.Tensor) -> np.ndarray:
    """Decode a Tensor the server sent; ValueError if it is inconsistent."""
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {t.dtype} is not one this client knows")
    shape = tuple(int(d) for d in t.shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(t.raw) != count * dtype.itemsize:
        raise ValueError(
            f"tensor has {len(t.raw)} bytes; shape {list(shape)} of {dtype.name} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(t.raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
