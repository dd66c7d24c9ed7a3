"""The exported model as the baselines see it: onnxruntime session + tensor names by role.

Reads ``manifest.json`` as plain JSON (the client never imports ``cellserve.model``). Session
options match the server's engine (full graph optimisation, workers that don't spin), so "engine
time vs raw onnxruntime" compares like with like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class OnnxModel:
    session: Any  # onnxruntime.InferenceSession
    names: dict[str, str]  # role -> tensor name (input, state_h, state_c, output, next_state_h, next_state_c)
    input_kind: str
    input_size: int
    output_size: int
    layers: int
    hidden: int

    @classmethod
    def load(cls, model_dir: Path, intra_op_threads: int = 0) -> OnnxModel:
        import onnxruntime as ort

        manifest = json.loads((model_dir / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(model_dir / manifest["onnx_file"]), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        if "states" not in manifest:  # format 1: every tensor with its role
            names = {t["role"]: t["name"] for t in manifest["inputs"] + manifest["outputs"]}
            return cls(session, names, manifest["input_kind"], int(manifest["input_size"]),
                       int(manifest["output_size"]), int(manifest["layers"]), int(manifest["hidden"]))  # fmt: skip
        x, y, (h, c) = manifest["input"], manifest["output"], manifest["states"]
        names = {"input": x["name"], "state_h": h["input"], "state_c": c["input"], "output": y["name"],
                 "next_state_h": h["output"], "next_state_c": c["output"]}  # fmt: skip
        tokens = x.get("vocab") is not None
        return cls(session, names, "tokens" if tokens else "features",
                   int(x["vocab"] if tokens else x["frame"][0]), int(y["frame"][0]),
                   int(manifest["lstm"]["layers"]), int(manifest["lstm"]["hidden"]))  # fmt: skip

    def sample_input(self, rng: np.random.Generator, batch: int, t: int) -> np.ndarray:
        """Random x: [B, T] int64 ids or [B, T, I] float32 features."""
        if self.input_kind == "tokens":
            return rng.integers(0, self.input_size, size=(batch, t), dtype=np.int64)
        return rng.standard_normal((batch, t, self.input_size), dtype=np.float32)

    def zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch, self.hidden)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def run(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.names
        y, hn, cn = self.session.run(
            [n["output"], n["next_state_h"], n["next_state_c"]], {n["input"]: x, n["state_h"]: h, n["state_c"]: c}
        )
        return y, hn, cn
