"""What the tests of every stateful class share: the batch-1 onnxruntime oracle with the state carried by hand,
one session's random plan, tolerances. Their fixtures (the models built and imported, one server) are in
conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from state_models import MODELS

from cellserve.model.manifest import Manifest, load_manifest

KEYS = '{"active": "k1", "keys": {"k1": "' + "5a" * 32 + '"}}'
WAIT_S = 90
FRAME_SIZES = (64, 80)  # the per-frame model's frame length is dynamic: sessions pick one of these


def tolerance(name: str) -> float:
    """Batched and batch-1 runs differ by float rounding; a float16 state rounds coarser."""
    return 2e-3 if name == "fp16_state" else 1e-4


class Batch1:
    """The oracle: the model's ONNX file at batch 1, its state carried by hand from call to call."""

    def __init__(self, model_dir: Path) -> None:
        self.m: Manifest = load_manifest(model_dir)
        self.session = ort.InferenceSession(str(model_dir / self.m.onnx_file), providers=["CPUExecutionProvider"])
        self.consts = {c.name: np.array(c.value, dtype=c.dtype).reshape(c.shape) for c in self.m.consts}

    def run(self, chunks: list[np.ndarray]) -> np.ndarray:
        """y for the chunks ([T, *frame] each) of one session, from zero state: [sum T, *out]."""
        m = self.m
        states = [np.zeros(s.graph_shape(1), s.dtype) for s in m.states]
        outputs = [m.output.name, *(s.output for s in m.states)]
        ys = []
        for chunk in chunks:
            for x in [chunk] if m.input.time_axis else list(chunk):  # a per-frame model: frame by frame
                feeds = {m.input.name: x[None], **self.consts}
                feeds.update((s.input, state) for s, state in zip(m.states, states, strict=True))
                y, *states = self.session.run(outputs, feeds)
                ys.append(y[0] if m.input.time_axis else y)  # [T, *out], or one frame's [1, *out]
        return np.concatenate(ys).astype(np.float32)


class Plan:
    """One session's random chunks ([T, *frame] of the model's dtype) and what came back."""

    def __init__(self, name: str, rng: np.random.Generator, chunks: int = 6) -> None:
        spec = MODELS[name]
        frame = tuple(int(rng.choice(FRAME_SIZES)) if d is None else d for d in spec.frame)
        self.name = name
        self.chunks = [
            rng.standard_normal((int(rng.integers(1, 5)), *frame)).astype(spec.x_dtype) for _ in range(chunks)
        ]
        self.outputs: list[np.ndarray] = []
        self.error: BaseException | None = None

    def check(self, oracle: Batch1) -> None:
        assert self.error is None, f"{self.name}: {type(self.error).__name__}: {self.error}"
        want = oracle.run(self.chunks[: len(self.outputs)])
        np.testing.assert_allclose(
            np.concatenate(self.outputs), want, atol=tolerance(self.name), rtol=0, err_msg=self.name
        )
