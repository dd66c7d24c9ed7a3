"""Array back-ends for the state pool and engine: numpy in host memory, CuPy in GPU memory.

Both expose the same few operations, so the pool and the engine have one code path; only the
memory they point onnxruntime at differs (``device_type`` "cpu" or "cuda" in IO binding).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class ArrayOps(Protocol):
    """What the pool and engine need from an array library."""

    device_type: str  # onnxruntime IO-binding device name: "cpu" or "cuda"
    device_id: int

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def take_rows(self, src: Any, rows: Any, out: Any) -> None: ...
    def put_rows(self, dst: Any, rows: Any, src: Any) -> None: ...
    def index(self, rows: np.ndarray) -> Any: ...
    def to_host(self, arr: Any) -> np.ndarray: ...
    def from_host(self, arr: np.ndarray) -> Any: ...
    def ptr(self, arr: Any) -> int: ...
    def synchronize(self) -> None: ...


class NumpyOps:
    """Host memory. ``take_rows``/``put_rows`` index axis 1 ([L, slots, H]) and touch only those rows."""

    device_type = "cpu"
    device_id = 0

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def take_rows(self, src: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        np.take(src, rows, axis=1, out=out)

    def put_rows(self, dst: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
        dst[:, rows, :] = src

    def index(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def to_host(self, arr: np.ndarray) -> np.ndarray:
        return np.array(arr, copy=True)

    def from_host(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr)

    def ptr(self, arr: np.ndarray) -> int:
        return int(arr.ctypes.data)

    def synchronize(self) -> None:
        return None


class CupyOps:
    """GPU memory through CuPy; gather/scatter are device kernels, only slot ids go up per batch."""

    device_type = "cuda"

    def __init__(self, device_id: int) -> None:
        import cupy  # deferred: only GPU deployments have it

        self._cp = cupy
        self.device_id = device_id
        self._device = cupy.cuda.Device(device_id)
        self._device.use()

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._cp.zeros(shape, dtype=dtype)

    def take_rows(self, src: Any, rows: Any, out: Any) -> None:
        self._cp.take(src, rows, axis=1, out=out)

    def put_rows(self, dst: Any, rows: Any, src: Any) -> None:
        dst[:, rows, :] = src

    def index(self, rows: np.ndarray) -> Any:
        return self._cp.asarray(rows)

    def to_host(self, arr: Any) -> np.ndarray:
        return self._cp.asnumpy(arr)

    def from_host(self, arr: np.ndarray) -> Any:
        return self._cp.asarray(arr)

    def ptr(self, arr: Any) -> int:
        return int(arr.data.ptr)

    def synchronize(self) -> None:
        self._cp.cuda.Device(self.device_id).synchronize()


def array_ops(device: str, device_id: int = 0) -> ArrayOps:
    """The back-end for ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        return CupyOps(device_id)
    return NumpyOps()
