"""One model's onnxruntime session, run with IO binding against the state pool's memory.

Per batch: gather the batch's slots into contiguous device buffers, bind them as ``h0``/``c0``,
bind ``hn``/``cn`` to device buffers, run, scatter back. Only ``x`` goes up and ``y`` comes down;
on CUDA no h/c byte crosses to the host. Tensors are paired with graph names by manifest role.
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
class _Buffers:
    """Contiguous ``[L, B, H]`` device buffers for one batch size, reused across calls."""

    h_in: Any
    c_in: Any
    h_out: Any
    c_out: Any


class Engine:
    """Runs batches of sessions through the ONNX graph ``(x, h0, c0) -> (y, hn, cn)``."""

    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path,
        pool: StatePool,
        *,
        intra_op_threads: int = 0,
    ) -> None:
        self.manifest = manifest
        self.pool = pool
        self.ops = pool.ops
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        # Idle onnxruntime workers must not spin: they would take the cores gRPC's event loop needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.ops.device_type == "cuda":
            cuda = ("CUDAExecutionProvider", {"device_id": self.ops.device_id})
            providers: list[Any] = [cuda, "CPUExecutionProvider"]
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
        self._buffers: dict[int, _Buffers] = {}

    def _buffers_for(self, batch: int) -> _Buffers:
        buf = self._buffers.get(batch)
        if buf is None:
            shape = (self.pool.layers, batch, self.pool.hidden)  # [L, B, H]
            buf = _Buffers(*(self.ops.zeros(shape, DTYPE) for _ in range(4)))
            self._buffers[batch] = buf
        return buf

    def _bind_state(self, binding: ort.IOBinding, name: str, arr: Any, output: bool) -> None:
        args = (name, self.ops.device_type, self.ops.device_id, DTYPE, tuple(arr.shape), self.ops.ptr(arr))
        if output:
            binding.bind_output(*args)
        else:
            binding.bind_input(*args)

    def run_slots(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance the sessions in ``slots`` by ``x`` ([B, T] or [B, T, I]); returns y [B, T, O] on the host."""
        batch, steps = x.shape[0], x.shape[1]
        buf = self._buffers_for(batch)
        rows = self.ops.index(slots)
        self.pool.gather(rows, buf.h_in, buf.c_in)
        self.ops.synchronize()  # gather ran on the array library's stream; onnxruntime uses its own
        y = np.empty((batch, steps, self.manifest.output_size), dtype=np.float32)  # [B, T, O]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.x_name, x)
        self._bind_state(binding, self.h_name, buf.h_in, output=False)
        self._bind_state(binding, self.c_name, buf.c_in, output=False)
        binding.bind_output(self.y_name, "cpu", 0, np.float32, y.shape, y.ctypes.data)
        self._bind_state(binding, self.hn_name, buf.h_out, output=True)
        self._bind_state(binding, self.cn_name, buf.c_out, output=True)
        self.session.run_with_iobinding(binding)
        self.pool.scatter(rows, buf.h_out, buf.c_out)
        self.ops.synchronize()
        return y

    def run_stateless(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run with caller-held state (host arrays); returns (y, hn, cn). The pool is not touched."""
        feeds = {self.x_name: x, self.h_name: h0.astype(DTYPE, copy=False), self.c_name: c0.astype(DTYPE, copy=False)}
        y, hn, cn = self.session.run([self.y_name, self.hn_name, self.cn_name], feeds)
        return y, hn, cn

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run every batch size once on zero state so the first real step pays no set-up cost."""
        layers, hidden = self.pool.layers, self.pool.hidden
        for b in batch_sizes:
            x = self.example_input(b, 1)
            zeros = np.zeros((layers, b, hidden), DTYPE)
            self.run_stateless(x, zeros, zeros)
            self._buffers_for(b)
        log.info("engine warmed", extra={"model": self.manifest.name, "batch_sizes": batch_sizes})

    def example_input(self, batch: int, steps: int) -> np.ndarray:
        if self.manifest.input_kind == "tokens":
            return np.zeros((batch, steps), dtype=self.x_dtype)  # [B, T]
        return np.zeros((batch, steps, self.manifest.input_size), dtype=self.x_dtype)  # [B, T, I]
