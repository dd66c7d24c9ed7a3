"""What the client and the server share about the native API beyond its generated stubs.

The client imports neither ``server`` nor ``model``; both import this (numpy and the stubs only):
the ``Tensor`` dtype codes, the encoding of an array as a ``Tensor``, and which ``ModelSummary``
fields are plain values (copied one to one from a manifest, and back into the client's ``ModelInfo``).
"""

from __future__ import annotations

import numpy as np

from cellserve.v1 import cellserve_pb2 as pb

# Tensor.dtype code → the little-endian numpy dtype its raw bytes hold.
DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}
PB_DTYPES: dict[str, int] = {dt.name: code for code, dt in DTYPES.items()}  # "float32" → DTYPE_FLOAT32

# ModelSummary's scalar fields, in proto order: the manifest's fields of the same names, and ModelInfo's.
SUMMARY_FIELDS = ("name", "version", "sha256", "input_kind", "layers", "hidden", "input_size", "output_size")


def to_proto(a: np.ndarray) -> pb.Tensor:
    """Encode an array (row-major, little-endian); TypeError for dtypes the API has no code for."""
    a = np.ascontiguousarray(a)
    code = PB_DTYPES.get(a.dtype.name)
    if code is None:
        raise TypeError(f"dtype {a.dtype} has no Tensor encoding; use one of {sorted(PB_DTYPES)}")
    return pb.Tensor(dtype=code, shape=list(a.shape), raw=a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def tensor_spec(name: str, role: str, dtype: str, shape: list[int | str]) -> pb.TensorSpec:
    """A graph tensor's description; dynamic dimensions (named, as in a manifest: "B", "T") become -1."""
    return pb.TensorSpec(
        name=name, role=role, dtype=PB_DTYPES[dtype], shape=[d if isinstance(d, int) else -1 for d in shape]
    )
