"""numpy ↔ ``cellserve.v1.Tensor`` (raw little-endian bytes) on the client side."""

from __future__ import annotations

import numpy as np

from cellserve.v1 import cellserve_pb2 as pb

DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}
PB_DTYPES: dict[str, int] = {dt.name: code for code, dt in DTYPES.items()}


def to_proto(a: np.ndarray) -> pb.Tensor:
    """Encode an array (row-major, little-endian); TypeError for dtypes the API has no code for."""
    a = np.ascontiguousarray(a)
    code = PB_DTYPES.get(a.dtype.name)
    if code is None:
        raise TypeError(f"dtype {a.dtype} has no Tensor encoding; use one of {sorted(PB_DTYPES)}")
    return pb.Tensor(dtype=code, shape=list(a.shape), raw=a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


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
