"""Baseline (c), the engine ceiling: onnxruntime in-process at the batch size cellserve formed, state fed back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellserve.client.bench.baselines.onnx_model import OnnxModel


@dataclass(frozen=True)
class OrtResult:
    batch: int
    t: int
    calls: int
    s_per_call: float

    @property
    def steps_per_s(self) -> float:
        return self.batch * self.t / self.s_per_call

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "t": self.t, "calls": self.calls, "ms_per_call": self.s_per_call * 1e3,
                "steps_per_s": self.steps_per_s}  # fmt: skip


def ort_ceiling(model: OnnxModel, batch: int, t: int, seconds: float, seed: int = 0) -> OrtResult:
    """Baseline (c): onnxruntime in-process at ``batch`` rows of ``t`` steps, state fed back each call."""
    rng = np.random.default_rng(seed)
    xs = [model.sample_input(rng, batch, t) for _ in range(8)]
    h, c = model.zero_state(batch)
    for x in xs[:2]:  # warm-up
        _, h, c = model.run(x, h, c)
    calls = 0
    start = time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        _, h, c = model.run(xs[calls % 8], h, c)
        calls += 1
    return OrtResult(batch, t, calls, (time.perf_counter() - start) / calls)
