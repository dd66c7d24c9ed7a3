"""One model's onnxruntime session, run with IO binding against the state pool's memory.

Per batch: gather the batch's slots into contiguous device buffers bound as ``h0``/``c0``, upload
x into its bound buffer, run with ``hn``/``cn``/``y`` bound to device buffers, scatter, download y.
Every tensor is bound on the pool's device (IO binding copies a host-bound input at bind time,
outside our stream), so onnxruntime inserts no copies; on CUDA the slot ids and ``x`` go up, ``y``
comes down, and no h/c byte crosses to the host. Each (batch size, steps) shape has an IO binding
made once over views of fixed-address buffers (no rebinding per call; the precondition for CUDA
graphs). Tensors are paired with graph names by manifest role.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cellserve.model.manifest import Manifest
from cellserve.server.errors import EngineUnavailable
from cellserve.server.state_pool import DTYPE, StatePool

log = logging.getLogger(__name__)


# Libraries onnxruntime-gpu's CUDA provider loads (cuDNN only lazily, at the first run since onnxruntime 1.28:
# a missing cuDNN passes the provider check, so it is looked for here, before warm-up).
CUDA_LIBRARIES = (("cuDNN 9", ("libcudnn.so.9",)), ("cuBLAS", ("libcublas.so.13", "libcublas.so.12")))
CUDA_HINT = (
    "install onnxruntime-gpu's CUDA libraries (the `gpu` extra and nvidia/cuda:13.x-cudnn-runtime, or the "
    "nvidia-cudnn-cu13 wheels) and put them on LD_LIBRARY_PATH"
)


def cuda_run_options() -> ort.RunOptions:
    """RunOptions of a CUDA run: no sync at the end (the stream orders y's download), no graph capture."""
    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    options.add_run_config_entry("gpu_graph_id", "-1")  # set, never looked up in vain (see Engine)
    return options


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of pip-installed NVIDIA packages, where onnxruntime-gpu looks for them."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # the system's libraries may still be found; the checks below decide
        log.warning("onnxruntime could not preload CUDA libraries", extra={"error": str(e)})


def check_cuda_libraries(load: Any = None) -> None:
    """EngineUnavailable naming the first CUDA library that cannot be loaded (``load``: ``ctypes.CDLL``)."""
    import ctypes

    load = load or ctypes.CDLL
    for what, names in CUDA_LIBRARIES:
        errors = []
        for name in names:
            try:
                load(name)
                break
            except OSError as e:
                errors.append(str(e))
        else:
            raise EngineUnavailable(f"device=cuda needs {what} ({' or '.join(names)}): {errors[0]}; {CUDA_HINT}")


# What onnxruntime, CUDA and CuPy say when memory runs out (lower case): "Failed to allocate memory for requested
# buffer" (onnxruntime's arena), "std::bad_alloc", "CUDA error cudaErrorMemoryAllocation: out of memory",
# "CUBLAS_STATUS_ALLOC_FAILED", cuDNN's "CUDNN_STATUS_ALLOC_FAILED".
OUT_OF_MEMORY = ("failed to allocate memory", "bad_alloc", "out of memory", "alloc_failed", "memoryallocation")


def out_of_memory(error: BaseException) -> bool:
    """Whether an engine call failed for lack of memory (host or device): a step the client can shrink."""
    if isinstance(error, MemoryError):  # CuPy's OutOfMemoryError is one
        return True
    text = str(error).lower()
    return any(marker in text for marker in OUT_OF_MEMORY)


MAX_BUCKETS = 256  # IO bindings kept (one per batch size × chunk length seen), least recently used dropped


@dataclass
class _Bucket:
    """One (batch size, steps) shape: views of the engine's fixed buffers, bound once in an IO binding."""

    x: Any  # [B, T] or [B, T, I]
    y: Any  # [B, T, O]
    h_in: Any  # [L, B, H]
    c_in: Any
    h_out: Any
    c_out: Any
    binding: ort.IOBinding


class _Flat:
    """A growable flat buffer; views of its first n elements are contiguous tensors of any shape."""

    def __init__(self, ops: Any, dtype: Any) -> None:
        self.ops, self.dtype, self.size, self.buf = ops, dtype, 0, None

    def fits(self, n: int) -> bool:
        return n <= self.size

    def grow(self, n: int) -> None:
        self.size = 1 << max(n - 1, 0).bit_length()  # a power of two: few regrowths
        self.buf = self.ops.zeros((self.size,), self.dtype)

    def view(self, shape: tuple[int, ...]) -> Any:
        return self.buf[: int(np.prod(shape))].reshape(shape)


class Engine:
    """Runs batches of sessions through the ONNX graph ``(x, h0, c0) -> (y, hn, cn)``."""

    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path,
        pool: StatePool,
        *,
        intra_op_threads: int = 0,
        profile_prefix: str | None = None,
        ort_sync: bool = False,
    ) -> None:
        """``profile_prefix``: write an onnxruntime profile (``end_profiling()`` returns its path).
        ``ort_sync``: let onnxruntime wait for its stream at the end of every run (CUDA; the stream
        already orders gather → run → scatter → y, so the default skips that host sync)."""
        self.manifest = manifest
        self.pool = pool
        self.ops = pool.ops
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        # Idle onnxruntime workers must not spin: they would take the cores gRPC's event loop needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        # None unless needed. onnxruntime 1.31's run_with_iobinding looks up "gpu_graph_id" in any RunOptions it
        # is given; a missing key costs a C++ exception, ~70-80 µs per call (measured), so it is always set.
        self.run_options: ort.RunOptions | None = None
        if self.ops.device_type == "cuda":
            _preload_cuda_libraries()
            check_cuda_libraries()
            cuda = (
                "CUDAExecutionProvider",
                # onnxruntime runs its kernels on the pool's stream: ordered with gather/scatter, no syncs between.
                {"device_id": str(self.ops.device_id), "user_compute_stream": str(self.ops.stream_ptr)},
            )
            providers: list[Any] = [cuda, "CPUExecutionProvider"]
            if not ort_sync:
                self.run_options = cuda_run_options()
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(Path(model_dir) / manifest.onnx_file), opts, providers=providers)
        if self.ops.device_type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise EngineUnavailable(
                "device=cuda but onnxruntime could not load its CUDA execution provider "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu and the CUDA libraries"
            )
        self.names = manifest.names
        self.x_dtype = np.dtype(manifest.input_dtype)
        # Fixed-address device buffers sized for the largest shape seen; every bucket binds views of them.
        self._flat = {
            "x": _Flat(self.ops, self.x_dtype),
            "y": _Flat(self.ops, np.float32),
            **{k: _Flat(self.ops, DTYPE) for k in ("h_in", "c_in", "h_out", "c_out")},
        }
        self._buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()

    def _shapes(self, batch: int, steps: int) -> dict[str, tuple[int, ...]]:
        m = self.manifest
        state = m.state_shape(batch)  # [L, B, H]
        return {
            "x": m.input_shape(batch, steps),  # [B, T] or [B, T, I]
            "y": m.output_shape(batch, steps),  # [B, T, O]
            **dict.fromkeys(("h_in", "c_in", "h_out", "c_out"), state),
        }

    def _bucket(self, batch: int, steps: int) -> _Bucket:
        key = (batch, steps)
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        shapes = self._shapes(batch, steps)
        for name, shape in shapes.items():
            flat = self._flat[name]
            if not flat.fits(int(np.prod(shape))):
                flat.grow(int(np.prod(shape)))
                self._buckets.clear()  # their views point at the old buffer
        views = {name: self._flat[name].view(shape) for name, shape in shapes.items()}
        binding = self.session.io_binding()
        n = self.names
        for name, tensor, output in (
            (n.x, views["x"], False),
            (n.h0, views["h_in"], False),
            (n.c0, views["c_in"], False),
            (n.y, views["y"], True),
            (n.hn, views["h_out"], True),
            (n.cn, views["c_out"], True),
        ):
            self._bind(binding, name, tensor, output)
        bucket = _Bucket(binding=binding, **views)
        self._buckets[key] = bucket
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket

    def _bind(self, binding: ort.IOBinding, name: str, arr: Any, output: bool) -> None:
        """Bind ``arr`` in place: onnxruntime reads or writes exactly this memory, on the pool's device."""
        args = (name, self.ops.device_type, self.ops.device_id, arr.dtype, tuple(arr.shape), self.ops.ptr(arr))
        if output:
            binding.bind_output(*args)
        else:
            binding.bind_input(*args)

    def run_slots(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance the sessions in ``slots`` by ``x`` ([B, T] or [B, T, I]); returns y [B, T, O] on the host.

        Only the B rows of ``slots`` are gathered and scattered. On CUDA the host sends the slot ids
        and x and receives y; h and c stay in device memory.
        """
        bucket = self._bucket(x.shape[0], x.shape[1])
        rows = self.ops.index(slots)
        self.pool.gather(rows, bucket.h_in, bucket.c_in)
        self.ops.copy_in(bucket.x, x)
        self.session.run_with_iobinding(bucket.binding, self.run_options)
        try:
            self.pool.scatter(rows, bucket.h_out, bucket.c_out)
            return self.ops.download(bucket.y)  # a host copy; on CUDA it waits for the stream: the only host sync
        except BaseException:
            # A failed call must leave its slots as they were (the scheduler retries its innocent steps): y never
            # reached the host (the download's buffer could not be allocated, a stream error surfaced), so the
            # state gathered into h_in/c_in, untouched by the run, is written back. Costs nothing unless it fails.
            self.pool.scatter(rows, bucket.h_in, bucket.c_in)
            raise

    def run_stateless(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run with caller-held state (host arrays); returns (y, hn, cn). The pool is not touched."""
        n = self.names
        feeds = {n.x: x, n.h0: h0.astype(DTYPE, copy=False), n.c0: c0.astype(DTYPE, copy=False)}
        y, hn, cn = self.session.run([n.y, n.hn, n.cn], feeds)
        return y, hn, cn

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run every batch size (T=1) once through the pool path so the first real step pays no set-up cost.

        It gathers slot 0 into every row and scatters the gathered state back unchanged, so the
        gather/scatter kernels are compiled (CuPy) without changing any slot.
        """
        layers, hidden = self.pool.layers, self.pool.hidden
        for b in sorted(batch_sizes, reverse=True):  # the largest first: buffers are sized once
            x = self.example_input(b, 1)
            zeros = np.zeros((layers, b, hidden), DTYPE)
            try:
                self.run_stateless(x, zeros, zeros)
            except Exception as e:  # e.g. a library the provider loads only at its first run
                raise EngineUnavailable(
                    f"model {self.manifest.name!r} failed its first run on {self.ops.device_type}: {e}"
                    + (f"; {CUDA_HINT}" if self.ops.device_type == "cuda" else "")
                ) from e
            bucket = self._bucket(b, 1)
            rows = self.ops.index(np.zeros(b, dtype=np.int64))
            self.pool.gather(rows, bucket.h_in, bucket.c_in)
            self.ops.copy_in(bucket.x, x)
            self.session.run_with_iobinding(bucket.binding, self.run_options)
            self.pool.scatter(rows, bucket.h_in, bucket.c_in)
            self.ops.download(bucket.y)
        log.info("engine warmed", extra={"model": self.manifest.name, "batch_sizes": batch_sizes})

    def end_profiling(self) -> str:
        """Stop onnxruntime profiling (``profile_prefix``) and return the JSON trace's path."""
        return str(self.session.end_profiling())

    def example_input(self, batch: int, steps: int) -> np.ndarray:
        """Zeros of x's shape: ``[B, T]`` or ``[B, T, I]``."""
        return np.zeros(self.manifest.input_shape(batch, steps), dtype=self.x_dtype)
