"""What the client and the server share about the native API beyond its generated stubs.

The client imports neither ``server`` nor ``model``; both import this (numpy and the stubs only):
the ``Tensor`` dtype codes, an array's encoding as a ``Tensor`` and its decoding, and which ``ModelSummary``
fields are plain values (copied one to one from a manifest, and back into the client's ``ModelInfo``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
NATIVE: dict[int, np.dtype] = {code: dt.newbyteorder("=") for code, dt in DTYPES.items()}  # decoded arrays
# As a grpcurl/JSON user writes them, with the numpy type each means: "DTYPE_INT64 (int64), …"
WIRE_NAMES = ", ".join(f"{pb.DType.Name(code)} ({dt.name})" for code, dt in sorted(DTYPES.items()))

# ModelSummary's scalar fields, in proto order: the manifest's fields of the same names, and ModelInfo's.
SUMMARY_FIELDS = ("name", "version", "sha256", "input_kind", "layers", "hidden", "input_size", "output_size")

# The most dimensions a client's tensor may declare. Ours have at most 3: [T] and [T, I] on the native API,
# [B, T], [B, T, I] and state [B, L, H] on OIP; 8 leaves room and stays far below numpy's own limit (64).
MAX_RANK = 8
# The most elements a client's tensor may declare: a gRPC message is at most 2 GiB, and every element
# takes at least one byte, so no request can carry more.
MAX_ELEMENTS = 2**31


def element_count(shape: Sequence[int], error: Callable[[str], Exception], what: str = "tensor") -> int:
    """The element count of a client-declared ``shape``, once it is one an array can have.

    ``error(message)`` is raised for more than :data:`MAX_RANK` dimensions, a negative dimension, or
    dimensions that multiply (zeros left out) past :data:`MAX_ELEMENTS`; the count is a Python int, exact,
    so the caller's comparison with the bytes (or values) sent cannot wrap. The one shape check of every
    decoder of client tensors (native ``to_numpy``, OIP inputs): numpy never sees an impossible shape.
    """
    if len(shape) > MAX_RANK:
        raise error(f"{what} shape {_shown(shape)} has {len(shape)} dimensions; at most {MAX_RANK} are accepted")
    count = math.prod(shape)
    if 0 < count <= MAX_ELEMENTS and min(shape, default=1) > 0:
        return count  # the common case: every dimension positive, the count in range
    if min(shape, default=0) < 0:  # two negative dimensions multiply to a positive count
        raise error(f"{what} shape {list(shape)} has a negative dimension")
    extent = math.prod(d for d in shape if d)  # numpy refuses even an empty array whose other dimensions overflow
    if extent > MAX_ELEMENTS:
        dims = "dimensions" if count else "nonzero dimensions"
        raise error(
            f"{what} shape {list(shape)} is too large: its {dims} multiply to {extent}, over the {MAX_ELEMENTS} "
            "elements one message can carry (gRPC messages are at most 2 GiB); send fewer steps per message"
        )
    return count


def _shown(shape: Sequence[int]) -> str:
    """A shape for a message, its first dimensions only when there are too many to list."""
    if len(shape) <= MAX_RANK:
        return str(list(shape))
    return "[" + ", ".join(map(str, shape[:MAX_RANK])) + ", …]"


def to_numpy(t: pb.Tensor, error: Callable[[str], Exception] = ValueError) -> np.ndarray:
    """Decode a Tensor; ``error(message)`` is raised if its dtype, shape or byte length is inconsistent.

    Called once per message on both sides, so it is lean: one read of ``raw``, a view of its bytes.
    """
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise error(f"tensor dtype {_dtype_name(t.dtype)} is not supported; set dtype to one of {WIRE_NAMES}")
    shape = t.shape[:]  # a list of Python ints: the cheapest copy of a repeated field
    if not shape:
        raise error("tensor has no shape; give its dimensions, e.g. [T] for T token ids")
    count = element_count(shape, error)
    if count == 0:
        raise error(f"tensor shape {shape} is empty; a step needs at least one element")
    raw = t.raw  # each access of a bytes field makes a new bytes object: once
    if len(raw) != count * dtype.itemsize:
        raise error(f"tensor raw has {len(raw)} bytes; shape {shape} of {dtype.name} needs {count * dtype.itemsize}")
    a = np.ndarray(shape, dtype, raw)  # a read-only view of raw, no copy
    return a if dtype.isnative else a.astype(NATIVE[t.dtype])


def _dtype_name(code: int) -> str:
    try:
        return f"{pb.DType.Name(code)} ({code})"
    except ValueError:
        return str(code)


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
