"""Offline generation: run an exported byte-level model with onnxruntime (no torch, no server).

The prompt's UTF-8 bytes go through the graph in one call; then one byte at a time is sampled with
:class:`cellserve.model.sampling.Sampler` (the same sampler the server's Generate RPC uses) and fed back,
carrying ``hn``/``cn`` as the next ``h0``/``c0``.
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
        self.names = {role: self.manifest.tensor(role).name for role in ("input", "state_h", "state_c")}
        self.out_names = [self.manifest.tensor(r).name for r in ("output", "next_state_h", "next_state_c")]

    def step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens [T] int64, h/c [L, 1, H] -> (logits of the last step [V], hn, cn)."""
        feeds = {self.names["input"]: tokens.reshape(1, -1), self.names["state_h"]: h, self.names["state_c"]: c}
        y, hn, cn = self.session.run(self.out_names, feeds)  # y [1, T, V]; hn, cn [L, 1, H]
        return y[0, -1], hn, cn

    def generate(
        self, prompt: str, *, max_bytes: int = 200, temperature: float = 0.8, top_k: int = 0, seed: int | None = None
    ) -> Iterator[int]:
        """Yield up to ``max_bytes`` sampled byte values following ``prompt``."""
        if not prompt:
            raise ValueError("the prompt must not be empty (the model needs at least one byte to condition on)")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        sampler = Sampler(temperature, top_k, seed)
        shape = (self.manifest.layers, 1, self.manifest.hidden)  # [L, 1, H]
        h = np.zeros(shape, np.float32)
        c = np.zeros(shape, np.float32)
        tokens = np.frombuffer(prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [T]
        logits, h, c = self.step(tokens, h, c)  # [V]
        for i in range(max_bytes):
            token = sampler.next_token(logits)
            yield token
            if i + 1 < max_bytes:
                logits, h, c = self.step(np.array([token], dtype=np.int64), h, c)


def generate_text(model_dir: Path | str, prompt: str, **kwargs: object) -> bytes:
    """All the sampled bytes at once (convenience for tests and scripts)."""
    return bytes(Generator(model_dir).generate(prompt, **kwargs))  # type: ignore[arg-type]
