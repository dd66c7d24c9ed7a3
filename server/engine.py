"""One model's onnxruntime session, run with IO binding against the state pool's memory.

Per batch: gather the batch's slots into contiguous device buffers bound as ``h0``/``c0``, upload
x, run with ``hn``/``cn`` bound to device buffers, scatter them back, download y. Every tensor is
bound on the pool's device (IO binding copies a host-bound input at bind time, outside our stream),
so onnxruntime inserts no copies; on CUDA the slot ids and ``x`` go up, ``y`` comes down, and no
h/c byte crosses to the host. One IO binding per batch size is kept with the state buffers bound
once; x and y are rebound per call. Tensors are paired with graph names by manifest role.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cellserve.model.manifest import Manifest
from cellserve.server.state_pool import DTYPE, StatePool

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    """One batch size: ``[L, B, H]`` views of the state buffers and an IO binding with them bound once."""

    h_in: Any
    c_in: Any
    h_out: Any
    c_out: Any
    binding: ort.IOBinding


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
        self.run_options = ort.RunOptions()
        if self.ops.device_type == "cuda":
            cuda = (
                "CUDAExecutionProvider",
                # onnxruntime runs its kernels on the pool's stream: ordered with gather/scatter, no syncs between.
                {"device_id": str(self.ops.device_id), "user_compute_stream": str(self.ops.stream_ptr)},
            )
            providers: list[Any] = [cuda, "CPUExecutionProvider"]
            if not ort_sync:
                self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(Path(model_dir) / manifest.onnx_file), opts, providers=providers)
        if self.ops.device_type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError(
                "device=cuda but onnxruntime could not load its CUDA execution provider "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu and the CUDA libraries"
            )
        self.x_name = manifest.tensor("input").name
        self.h_name = manifest.tensor("state_h").name
        self.c_name = manifest.tensor("state_c").name
        self.y_name = manifest.tensor("output").name
        self.hn_name = manifest.tensor("next_state_h").name
        self.cn_name = manifest.tensor("next_state_c").name
        self.x_dtype = np.dtype(manifest.tensor("input").dtype)
        self._flat: list[Any] = []  # h_in, c_in, h_out, c_out: flat device buffers for the largest batch seen
        self._flat_rows = 0
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, batch: int) -> _Bucket:
        bucket = self._buckets.get(batch)
        if bucket is not None:
            return bucket
        layers, hidden = self.pool.layers, self.pool.hidden
        if batch > self._flat_rows:  # grow to a power of two; older buckets point at the old buffers
            self._flat_rows = 1 << (batch - 1).bit_length()
            self._flat = [self.ops.zeros((layers * self._flat_rows * hidden,), DTYPE) for _ in range(4)]
            self._buckets.clear()
        shape = (layers, batch, hidden)  # [L, B, H], contiguous: the first L*B*H elements of each buffer
        h_in, c_in, h_out, c_out = (f[: layers * batch * hidden].reshape(shape) for f in self._flat)
        binding = self.session.io_binding()
        self._bind(binding, self.h_name, h_in, output=False)
        self._bind(binding, self.c_name, c_in, output=False)
        self._bind(binding, self.hn_name, h_out, output=True)
        self._bind(binding, self.cn_name, c_out, output=True)
        bucket = _Bucket(h_in, c_in, h_out, c_out, binding)
        self._buckets[batch] = bucket
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
        batch, steps = x.shape[0], x.shape[1]
        bucket = self._bucket(batch)
        rows = self.ops.index(slots)
        self.pool.gather(rows, bucket.h_in, bucket.c_in)
        x_dev = self.ops.upload(np.ascontiguousarray(x, dtype=self.x_dtype))
        y_dev = self.ops.empty((batch, steps, self.manifest.output_size), np.float32)  # [B, T, O]
        self._bind(bucket.binding, self.x_name, x_dev, output=False)
        self._bind(bucket.binding, self.y_name, y_dev, output=True)
        self.session.run_with_iobinding(bucket.binding, self.run_options)
        self.pool.scatter(rows, bucket.h_out, bucket.c_out)
        return self.ops.download(y_dev)  # waits for the stream: the batch's only host sync

    def run_stateless(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run with caller-held state (host arrays); returns (y, hn, cn). The pool is not touched."""
        feeds = {self.x_name: x, self.h_name: h0.astype(DTYPE, copy=False), self.c_name: c0.astype(DTYPE, copy=False)}
        y, hn, cn = self.session.run([self.y_name, self.hn_name, self.cn_name], feeds)
        return y, hn, cn

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run every batch size once through the pool path so the first real step pays no set-up cost.

        It gathers slot 0 into every row and scatters the gathered state back unchanged, so the
        gather/scatter kernels are compiled (CuPy) without changing any slot.
        """
        layers, hidden = self.pool.layers, self.pool.hidden
        for b in sorted(batch_sizes, reverse=True):  # the largest first: buffers are sized once
            x = self.example_input(b, 1)
            zeros = np.zeros((layers, b, hidden), DTYPE)
            self.run_stateless(x, zeros, zeros)
            bucket = self._bucket(b)
            rows = self.ops.index(np.zeros(b, dtype=np.int64))
            self.pool.gather(rows, bucket.h_in, bucket.c_in)
            y_dev = self.ops.empty((b, 1, self.manifest.output_size), np.float32)
            x_dev = self.ops.upload(x)
            self._bind(bucket.binding, self.x_name, x_dev, output=False)
            self._bind(bucket.binding, self.y_name, y_dev, output=True)
            self.session.run_with_iobinding(bucket.binding, self.run_options)
            self.pool.scatter(rows, bucket.h_in, bucket.c_in)
            self.ops.download(y_dev)
        log.info("engine warmed", extra={"model": self.manifest.name, "batch_sizes": batch_sizes})

    def end_profiling(self) -> str:
        """Stop onnxruntime profiling (``profile_prefix``) and return the JSON trace's path."""
        return str(self.session.end_profiling())

    def example_input(self, batch: int, steps: int) -> np.ndarray:
        if self.manifest.input_kind == "tokens":
            return np.zeros((batch, steps), dtype=self.x_dtype)  # [B, T]
        return np.zeros((batch, steps, self.manifest.input_size), dtype=self.x_dtype)  # [B, T, I]
