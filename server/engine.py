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

from cellserve.model.manifest import Manifest, ManifestError
from cellserve.server.errors import EngineUnavailable
from cellserve.server.state_pool import StatePool

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


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(double)": "float64"}  # fmt: skip


def check_graph(m: Manifest, session: ort.InferenceSession, model_dir: Path) -> None:
    """ManifestError (one line, naming the directory) where the manifest contradicts the graph it describes:
    a tensor the graph does not have, another dtype, or a fixed dim that differs from the graph's."""
    graph = {t.name: t for t in (*session.get_inputs(), *session.get_outputs())}
    wanted = [(m.input.name, m.input.dtype, None), (m.output.name, m.output.dtype, None)]
    wanted += [(s.input, s.dtype, s.shape) for s in m.states] + [(s.output, s.dtype, s.shape) for s in m.states]
    wanted += [(c.name, c.dtype, c.shape) for c in m.consts]
    for name, dtype, shape in wanted:
        where = f"cannot serve {model_dir}: manifest tensor {name!r}"
        t = graph.get(name)
        if t is None:
            raise ManifestError(f"{where} is not in the graph (it has {sorted(graph)}); re-import the model")
        if _ORT_DTYPES.get(t.type, t.type) != dtype:
            raise ManifestError(f"{where} is {dtype}, the graph's is {t.type}; re-import the model")
        if shape is not None and len(t.shape) == len(shape):
            for want, have in zip(shape, t.shape, strict=True):
                if isinstance(want, int) and isinstance(have, int) and want != have:
                    raise ManifestError(
                        f"{where} has shape {list(shape)}, the graph's is {list(t.shape)}; re-import the model"
                    )
        elif shape is not None and t.shape and all(isinstance(d, (int, str)) for d in t.shape):
            raise ManifestError(f"{where} has rank {len(shape)}, the graph's {len(t.shape)}; re-import the model")
    declared = {m.input.name, *(s.input for s in m.states), *(c.name for c in m.consts)}
    missing = sorted(t.name for t in session.get_inputs() if t.name not in declared)
    if missing:
        raise ManifestError(f"cannot serve {model_dir}: graph inputs {missing} have no role in the manifest; "
                            "re-import the model (a constant input needs --const NAME=VALUE)")  # fmt: skip


MAX_BUCKETS = 256  # IO bindings kept (one per batch size × step shape seen), least recently used dropped


@dataclass
class _Bucket:
    """One (batch size, step shape): views of the engine's fixed buffers, bound once in an IO binding."""

    x: Any  # graph layout: [B, T, *frame], or [B, *frame] (a per-frame model: one frame)
    y: Any | None  # [B, T, *out] or [B, *out]; None when its shape is dynamic (onnxruntime allocates it)
    states_in: list[Any]  # each state's graph layout, batch at its own axis
    states_out: list[Any]
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
    """Runs batches of sessions through the model's ONNX graph: x and every state in, y and every next state out.

    A model with a time axis runs a step of T in one call; a per-frame model (no time axis) runs its T
    frames one after another inside the same turn, each frame's next state fed to the next frame.
    """

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
        m = manifest
        check_graph(m, self.session, model_dir)
        self.time_axis = m.input.time_axis
        self.x_dtype = np.dtype(m.input.dtype)
        self.y_dtype = np.dtype(m.output.dtype)
        self.y_dynamic = any(d is None for d in m.output.frame)
        self.states = m.states
        # Constant inputs: device copies made once, bound in every bucket.
        self._consts = []
        for c in m.consts:
            host = np.array(c.value, dtype=np.dtype(c.dtype)).reshape(c.shape)
            dev = self.ops.zeros(c.shape, host.dtype)
            self.ops.copy_in(dev, host)
            self._consts.append((c.name, dev))
        # Fixed-address device buffers sized for the largest shape seen; every bucket binds views of them.
        self._flat = {"x": _Flat(self.ops, self.x_dtype), "y": _Flat(self.ops, self.y_dtype)}
        for i, spec in enumerate(self.states):
            self._flat[f"in{i}"] = _Flat(self.ops, np.dtype(spec.dtype))
            self._flat[f"out{i}"] = _Flat(self.ops, np.dtype(spec.dtype))
        self._buckets: OrderedDict[tuple[int, tuple[int, ...]], _Bucket] = OrderedDict()

    def _shapes(self, batch: int, step: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Graph shapes of one call: ``step`` is x's per-row shape ([T, *frame], or one [*frame])."""
        out = self.manifest.output.frame
        shapes = {"x": (batch, *step)}
        if not self.y_dynamic:
            shapes["y"] = (batch, step[0], *out) if self.time_axis else (batch, *out)  # type: ignore[arg-type]
        for i, spec in enumerate(self.states):
            shapes[f"in{i}"] = shapes[f"out{i}"] = spec.graph_shape(batch)
        return shapes

    def _bucket(self, batch: int, step: tuple[int, ...]) -> _Bucket:
        key = (batch, step)
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        shapes = self._shapes(batch, step)
        for name, shape in shapes.items():
            flat = self._flat[name]
            if not flat.fits(int(np.prod(shape))):
                flat.grow(int(np.prod(shape)))
                self._buckets.clear()  # their views point at the old buffer
        views = {name: self._flat[name].view(shape) for name, shape in shapes.items()}
        binding = self.session.io_binding()
        m = self.manifest
        self._bind(binding, m.input.name, views["x"], output=False)
        if self.y_dynamic:
            binding.bind_output(m.output.name, self.ops.device_type, self.ops.device_id)
        else:
            self._bind(binding, m.output.name, views["y"], output=True)
        for i, spec in enumerate(self.states):
            self._bind(binding, spec.input, views[f"in{i}"], output=False)
            self._bind(binding, spec.output, views[f"out{i}"], output=True)
        for name, value in self._consts:
            self._bind(binding, name, value, output=False)
        n = len(self.states)
        bucket = _Bucket(
            x=views["x"],
            y=views.get("y"),
            states_in=[views[f"in{i}"] for i in range(n)],
            states_out=[views[f"out{i}"] for i in range(n)],
            binding=binding,
        )
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

    def _run(self, bucket: _Bucket) -> np.ndarray:
        """One graph call on the bucket's buffers; y on the host (a copy: the buffers are reused next call)."""
        self.session.run_with_iobinding(bucket.binding, self.run_options)
        return self._download_y(bucket)

    def run_slots(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance the sessions in ``slots`` by ``x`` ([B, T, *frame]); returns y [B, T, *out] on the host.

        Only the B rows of ``slots`` are gathered and scattered. On CUDA the host sends the slot ids
        and x and receives y; the state stays in device memory.
        """
        rows = self.ops.index(slots)
        if self.time_axis:
            bucket = self._bucket(x.shape[0], x.shape[1:])
            self.pool.gather(rows, bucket.states_in)
            self.ops.copy_in(bucket.x, x)
            self.session.run_with_iobinding(bucket.binding, self.run_options)
            return self._finish(rows, bucket, None)
        bucket = self._bucket(x.shape[0], x.shape[2:])
        self.pool.gather(rows, bucket.states_in)
        ys = []
        for t in range(x.shape[1]):  # a per-frame model: one call per frame, the state carried on the device
            if t:
                for state_in, state_out in zip(bucket.states_in, bucket.states_out, strict=True):
                    self.ops.copy(state_in, state_out)
            self.ops.copy_in(bucket.x, np.ascontiguousarray(x[:, t]))
            ys.append(self._run(bucket))  # a failure here leaves the pool as it was: it is written only below
        return self._finish(rows, bucket, ys)

    def _download_y(self, bucket: _Bucket) -> np.ndarray:
        """y of the last call on the host (a copy: the buffers are reused next call)."""
        if bucket.y is not None:
            return self.ops.download(bucket.y)  # on CUDA it waits for the stream: the only host sync
        return np.array(bucket.binding.get_outputs()[0].numpy(), copy=True)  # a dynamic shape: ORT allocated it

    def _finish(self, rows: Any, bucket: _Bucket, frames: list[np.ndarray] | None) -> np.ndarray:
        """Scatter the next state and return y (downloaded, or the per-frame ``frames`` stacked); a failure leaves
        the slots as they were."""
        try:
            self.pool.scatter(rows, bucket.states_out)
            return self._download_y(bucket) if frames is None else np.stack(frames, axis=1)
        except BaseException:
            # A failed call must leave its slots as they were (the scheduler retries its innocent steps): y never
            # reached the host (the download's buffer could not be allocated, a stream error surfaced), so the
            # gathered state, which states_in still holds, is written back. Costs nothing unless it fails. After
            # several frames states_in holds a later state, so nothing is written back: there y is already on the
            # host and only the scatter itself could fail.
            if frames is None or len(frames) == 1:
                self.pool.scatter(rows, bucket.states_in)
            raise

    def run_stateless(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call with caller-held state (host arrays in graph layout); returns (y, next states).
        The pool is not touched."""
        feeds: dict[str, Any] = {self.manifest.input.name: x}
        for spec, state in zip(self.states, states, strict=True):
            feeds[spec.input] = state.astype(np.dtype(spec.dtype), copy=False)
        for c in self.manifest.consts:
            feeds[c.name] = np.array(c.value, dtype=np.dtype(c.dtype)).reshape(c.shape)
        outputs = [self.manifest.output.name, *(spec.output for spec in self.states)]
        y, *next_states = self.session.run(outputs, feeds)
        return y, next_states

    def zero_states(self, batch: int) -> list[np.ndarray]:
        """Zero state of ``batch`` rows, graph layout, on the host."""
        return [np.zeros(spec.graph_shape(batch), np.dtype(spec.dtype)) for spec in self.states]

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run every batch size (one step of the smallest shape) once through the pool path, so the first real
        step pays no set-up cost.

        It gathers slot 0 into every row and scatters the gathered state back unchanged, so the
        gather/scatter kernels are compiled (CuPy) without changing any slot.
        """
        for b in sorted(batch_sizes, reverse=True):  # the largest first: buffers are sized once
            x = self.example_input(b, 1)
            graph_x = x if self.time_axis else x[:, 0]
            try:
                self.run_stateless(graph_x, self.zero_states(b))
            except Exception as e:  # e.g. a library the provider loads only at its first run
                raise EngineUnavailable(
                    f"model {self.manifest.name!r} failed its first run on {self.ops.device_type}: {e}"
                    + (f"; {CUDA_HINT}" if self.ops.device_type == "cuda" else "")
                ) from e
            bucket = self._bucket(b, graph_x.shape[1:])
            rows = self.ops.index(np.zeros(b, dtype=np.int64))
            self.pool.gather(rows, bucket.states_in)
            self.ops.copy_in(bucket.x, graph_x)
            self._run(bucket)
            self.pool.scatter(rows, bucket.states_in)
        log.info("engine warmed", extra={"model": self.manifest.name, "batch_sizes": batch_sizes})

    def end_profiling(self) -> str:
        """Stop onnxruntime profiling (``profile_prefix``) and return the JSON trace's path."""
        return str(self.session.end_profiling())

    def example_input(self, batch: int, steps: int) -> np.ndarray:
        """Zeros of a step's batch: ``[B, T, *frame]`` (dynamic frame dims as in the manifest's example frame)."""
        frame = self.manifest.input.example_shape
        return np.zeros((batch, steps, *frame), dtype=self.x_dtype)
