"""Array back-ends for the state pool and engine: numpy in host memory, CuPy in GPU memory.

Both expose the same few operations, so the pool and the engine have one code path; only the
memory they point onnxruntime at differs (``device_type`` "cpu" or "cuda" in IO binding).

On CUDA every operation is issued on one CUDA stream per ``CupyOps`` (``stream_ptr``), and the
engine gives onnxruntime that same stream (``user_compute_stream``). Gather, the upload of x, the
onnxruntime kernels, scatter and the download of y are then ordered by the stream itself: the only
host synchronisation per batch is the one that waits for y. Device and stream are entered
explicitly in every call, never taken from CuPy's thread-local "current" ones, so calls from the
event-loop thread and from an engine worker thread land on the same device and stream.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from cellserve.server.errors import EngineUnavailable


class ArrayOps(Protocol):
    """What the pool and engine need from an array library."""

    device_type: str  # onnxruntime IO-binding device name: "cpu" or "cuda"
    device_id: int
    stream_ptr: int  # the CUDA stream every call is issued on (0 on the host)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def take_rows(self, src: Any, rows: Any, out: Any, axis: int) -> None: ...
    def put_rows(self, dst: Any, rows: Any, src: Any, axis: int) -> None: ...
    def copy(self, dst: Any, src: Any) -> None: ...
    def index(self, rows: np.ndarray) -> Any: ...
    def write_row(self, dst: Any, row: int, value: np.ndarray | float, axis: int) -> None: ...
    def read_row(self, src: Any, row: int, axis: int) -> np.ndarray: ...
    def copy_in(self, dst: Any, src: np.ndarray) -> None: ...
    def download(self, arr: Any) -> np.ndarray: ...
    def ptr(self, arr: Any) -> int: ...
    def synchronize(self) -> None: ...  # wait for every call issued so far (benchmarks and tests time or read after it)


class NumpyOps:
    """Host memory. A pool tensor is the graph's layout with the slots at the batch axis ``axis``;
    ``take_rows``/``put_rows`` copy the batch's slots to and from a graph-layout buffer, touching only those."""

    device_type = "cpu"
    device_id = 0
    stream_ptr = 0

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)  # calloc: pages are committed when first written

    def take_rows(self, src: np.ndarray, rows: np.ndarray, out: np.ndarray, axis: int) -> None:
        # One call per tensor, straight into the contiguous graph-layout buffer; "clip" skips the bounds check and
        # its buffering (the rows are the pool's own slot ids): 4-10x faster than mode "raise" (measured, B=1..64).
        np.take(src, rows, axis=axis, out=out, mode="clip")

    def put_rows(self, dst: np.ndarray, rows: np.ndarray, src: np.ndarray, axis: int) -> None:
        dst[_at(axis, rows)] = src

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        dst[...] = src

    def index(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def write_row(self, dst: np.ndarray, row: int, value: np.ndarray | float, axis: int) -> None:
        dst[_at(axis, row)] = value

    def read_row(self, src: np.ndarray, row: int, axis: int) -> np.ndarray:
        return np.array(src[_at(axis, row)], copy=True)

    def copy_in(self, dst: np.ndarray, src: np.ndarray) -> None:
        dst[...] = src

    def download(self, arr: np.ndarray) -> np.ndarray:
        return np.array(arr, copy=True)  # a copy: the engine reuses its output buffer next call

    def ptr(self, arr: np.ndarray) -> int:
        return int(arr.ctypes.data)

    def synchronize(self) -> None:
        return None


class CupyOps:
    """GPU memory through CuPy on one device and one stream; per batch only slot ids and x go up, y comes down."""

    device_type = "cuda"

    def __init__(self, device_id: int) -> None:
        try:
            import cupy  # deferred: only GPU deployments have it
            import cupyx
        except ImportError as e:
            raise EngineUnavailable(
                f"device=cuda needs CuPy for the device-resident state pool ({e}); install the `gpu` extra "
                "(pip install 'cellserve[gpu]'), or serve with --device cpu"
            ) from None

        self._cp = cupy
        self._cpx = cupyx
        self.device_id = device_id
        self._device = cupy.cuda.Device(device_id)
        try:
            with self._device:
                # Non-blocking: it never waits on the legacy default stream other libraries may use.
                self._stream = cupy.cuda.Stream(non_blocking=True)
        except cupy.cuda.runtime.CUDARuntimeError as e:  # no GPU, no driver, or another ordinal: one line
            raise EngineUnavailable(
                f"device=cuda:{device_id}: no usable CUDA device is visible to this process ({e}); a container "
                "needs the GPU passed in (--gpus / --device nvidia.com/gpu=all / the nvidia.com/gpu resource), "
                "or serve with --device cpu"
            ) from None
        self.stream_ptr = int(self._stream.ptr)
        self._staged: deque[tuple[Any, Any]] = deque()  # (event, pinned buffer) until its copy has run
        self._staged_lock = threading.Lock()

    @contextmanager
    def _on(self) -> Iterator[None]:
        with self._device, self._stream:
            yield

    def _keep_until_copied(self, pinned: Any) -> None:
        """Hold a pinned staging buffer until the stream has passed its copy (then the pool may reuse it)."""
        event = self._stream.record()
        with self._staged_lock:
            self._staged.append((event, pinned))
            while self._staged and self._staged[0][0].done:
                self._staged.popleft()

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        with self._on():
            arr = self._cp.zeros(shape, dtype=dtype)
        self._stream.synchronize()  # memset is asynchronous; the array is complete before anyone else sees it
        return arr

    def take_rows(self, src: Any, rows: Any, out: Any, axis: int) -> None:
        with self._on():
            self._cp.take(src, rows, axis=axis, out=out)

    def put_rows(self, dst: Any, rows: Any, src: Any, axis: int) -> None:
        with self._on():
            dst[_at(axis, rows)] = src

    def copy(self, dst: Any, src: Any) -> None:
        with self._on():
            dst[...] = src

    def index(self, rows: np.ndarray) -> Any:
        return self.upload(np.ascontiguousarray(rows, dtype=np.int64))

    def write_row(self, dst: Any, row: int, value: np.ndarray | float, axis: int) -> None:
        with self._on():
            if isinstance(value, np.ndarray):
                dst[_at(axis, row)] = self.upload(np.ascontiguousarray(value, dtype=dst.dtype))
            else:
                dst[_at(axis, row)] = value

    def read_row(self, src: Any, row: int, axis: int) -> np.ndarray:
        return self.to_host(src[_at(axis, row)])

    def upload(self, arr: np.ndarray) -> Any:
        """Stage ``arr`` in pinned host memory and copy it up asynchronously on the stream."""
        with self._on():
            out = self._cp.empty(arr.shape, dtype=arr.dtype)
            self.copy_in(out, arr)
            return out

    def copy_in(self, dst: Any, src: np.ndarray) -> None:
        """Host ``src`` into the device array ``dst`` (same shape, contiguous) via pinned memory, asynchronously."""
        with self._on():
            pinned = self._cpx.empty_pinned(dst.shape, dtype=dst.dtype)
            pinned[...] = src
            dst.set(pinned, stream=self._stream)
            self._keep_until_copied(pinned)

    def download(self, arr: Any) -> np.ndarray:
        """Copy ``arr`` into pinned host memory on the stream and wait for it (the one host sync per batch).

        ``get(blocking=True)`` already waits for the stream: no second synchronize.
        """
        with self._on():
            out = self._cpx.empty_pinned(arr.shape, dtype=arr.dtype)
            arr.get(stream=self._stream, out=out, blocking=True)
            return out

    def to_host(self, arr: Any) -> np.ndarray:
        """A host copy of any device array (contiguous or not), read on the stream after its queued writes."""
        with self._on():
            return np.array(self.download(self._cp.ascontiguousarray(arr)), copy=True)

    def ptr(self, arr: Any) -> int:
        return int(arr.data.ptr)

    def synchronize(self) -> None:
        self._stream.synchronize()


def _at(axis: int, index: Any) -> tuple[Any, ...]:
    """An index that selects ``index`` on ``axis`` and everything on the axes before it."""
    return (slice(None),) * axis + (index,)


def array_ops(device: str, device_id: int = 0) -> ArrayOps:
    """The back-end for ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        return CupyOps(device_id)
    return NumpyOps()
