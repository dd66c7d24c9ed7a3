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
    calls: int  # steps of ``batch`` rows (a per-frame model's step is T graph calls)
    s_per_call: float
    fixed_batch: int | None = None  # the graph's batch is fixed (1): it ran at that batch, whatever was asked

    @property
    def steps_per_s(self) -> float:
        return self.batch * self.t / self.s_per_call

    @classmethod
    def pooled(cls, rounds: list[OrtResult]) -> OrtResult:
        """Several measurements of one batch and T as one: every call over all their time."""
        calls = sum(r.calls for r in rounds)
        first = rounds[0]
        return cls(first.batch, first.t, calls, sum(r.calls * r.s_per_call for r in rounds) / calls, first.fixed_batch)

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "t": self.t, "calls": self.calls, "ms_per_call": self.s_per_call * 1e3,
                "steps_per_s": self.steps_per_s, "fixed_batch": self.fixed_batch}  # fmt: skip


def ort_ceiling(model: OnnxModel, batch: int, t: int, seconds: float, seed: int = 0) -> OrtResult:
    """Baseline (c): onnxruntime in-process at ``batch`` rows of ``t`` steps, every state fed back each call.

    A "call" is one step as cellserve's engine runs it (``OnnxModel.run``: one graph call with a time axis,
    T graph calls of one frame for a per-frame model), so its time compares with the engine's time per call.
    A graph whose batch is fixed at 1 runs at batch 1 whatever ``batch`` is: that is all it can do, and the
    server serves it the same way.
    """
    if model.fixed_batch is not None:
        batch = min(batch, model.fixed_batch)
    rng = np.random.default_rng(seed)
    xs = [model.sample_input(rng, batch, t) for _ in range(8)]
    states = model.zero_states(batch)
    for x in xs[:2]:  # warm-up
        _, states = model.run(x, states)
    calls = 0
    start = time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        _, states = model.run(xs[calls % 8], states)
        calls += 1
    return OrtResult(batch, t, calls, (time.perf_counter() - start) / calls, model.fixed_batch)
