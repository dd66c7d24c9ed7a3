"""Offline generation: run an exported byte-level model with onnxruntime (no torch, no server).

The prompt's UTF-8 bytes go through the graph in one call (a per-frame model: one byte per call); then
one byte at a time is sampled with :class:`cellserve.model.sampling.Sampler` (the same sampler the
server's Generate RPC uses) and fed back, carrying every next state as the next call's state (any token
model of the general contract: an LSTM's h and c, a GRU's one state, …).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cellserve.model.manifest import Manifest, load_manifest
from cellserve.model.sampling import Sampler


class Generator:
    """A loaded token model: ``Generator(model_dir).generate(prompt, ...)`` yields byte values as sampled."""

    def __init__(self, model_dir: Path | str) -> None:
        self.model_dir = Path(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        if self.manifest.vocab is None:
            raise ValueError(f"model {self.manifest.name!r} takes features, not tokens; generate needs a token model")
        if self.manifest.vocab != 256:
            raise ValueError(f"model {self.manifest.name!r} has vocabulary {self.manifest.input_size}; expected bytes")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.model_dir / self.manifest.onnx_file), opts, providers=["CPUExecutionProvider"]
        )
        m = self.manifest
        if len(m.output.frame) != 1 or m.output.frame[0] is None:
            raise ValueError(f"model {m.name!r} outputs {m.describe_output()} per step; generate needs logits [V]")
        self.consts = {c.name: np.array(c.value, dtype=c.dtype).reshape(c.shape) for c in m.consts}
        self.outputs = [m.output.name, *(s.output for s in m.states)]

    def zero_state(self) -> list[np.ndarray]:
        """Every state tensor at batch 1, zeros (the graph's layout)."""
        return [np.zeros(s.graph_shape(1), s.dtype) for s in self.manifest.states]

    def step(self, tokens: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [T] int64 and the state -> (logits of the last step [V], the next state)."""
        m = self.manifest
        for token in [tokens] if m.input.time_axis else [t for t in tokens]:  # a per-frame model: one per call
            feeds = {m.input.name: token.reshape(1, -1) if m.input.time_axis else token.reshape(1), **self.consts}
            feeds.update((s.input, state) for s, state in zip(m.states, states, strict=True))
            y, *states = self.session.run(self.outputs, feeds)  # y [1, T, V] or [1, V]
        return y.reshape(-1, y.shape[-1])[-1], states

    def generate(
        self, prompt: str, *, max_bytes: int = 200, temperature: float = 0.8, top_k: int = 0, seed: int | None = None
    ) -> Iterator[int]:
        """Yield up to ``max_bytes`` sampled byte values following ``prompt``."""
        if not prompt:
            raise ValueError("the prompt must not be empty (the model needs at least one byte to condition on)")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        sampler = Sampler(temperature, top_k, seed)
        tokens = np.frombuffer(prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [T]
        logits, states = self.step(tokens, self.zero_state())  # [V]
        for i in range(max_bytes):
            token = sampler.next_token(logits)
            yield token
            if i + 1 < max_bytes:
                logits, states = self.step(np.array([token], dtype=np.int64), states)


def generate_text(model_dir: Path | str, prompt: str, **kwargs: object) -> bytes:
    """All the sampled bytes at once (convenience for tests and scripts)."""
    return bytes(Generator(model_dir).generate(prompt, **kwargs))  # type: ignore[arg-type]
