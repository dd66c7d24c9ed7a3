"""The served model as the baselines see it: an onnxruntime session and the model's contract, from its manifest.

Reads ``manifest.json`` as plain JSON, either format (the client never imports ``cellserve.model``: a
bench machine needs no server code to run the baselines). Format 2 is the general contract: one input
``x`` (a time axis or per-frame, dynamic frame dims), any number of state pairs each with its own shape,
dtype and batch axis, constant inputs, one output ``y``, and perhaps a batch fixed at 1. Format 1 is our
LSTM's ``(x, h0, c0) -> (y, hn, cn)`` with h and c float32 ``[L, B, H]``.

Session options match the server's engine (full graph optimisation, workers that don't spin), and
:meth:`OnnxModel.run` does what the engine does for one step (a per-frame model's frames one after
another, the state carried), so "cellserve vs raw onnxruntime" compares like with like.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellserve.client.bench.load import DYNAMIC_DIM

BATCH = "B"  # the batch axis in a manifest state's shape


@dataclass(frozen=True)
class StatePair:
    """One state pair: graph input ``input`` takes the state, graph output ``output`` is the next state.

    ``shape`` is the graph's, with ``"B"`` at the batch axis (any position).
    """

    input: str
    output: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def batch_axis(self) -> int:
        return self.shape.index(BATCH)

    def graph_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @property
    def session_bytes(self) -> int:
        """One session's share: the graph shape at batch 1, in bytes."""
        return math.prod(self.graph_shape(1)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class OnnxModel:
    session: Any  # onnxruntime.InferenceSession
    name: str
    x_name: str
    y_name: str
    x_dtype: str  # int64 (token ids), float32 or float16
    vocab: int | None  # token models: ids in [0, vocab)
    time_axis: bool  # False: per-frame, x is [B, *frame] and a step's T frames run one after another
    frame: tuple[int | None, ...]  # x's dims after batch (and time); None: dynamic
    example: tuple[int, ...] | None  # a frame the graph is known to run (import's probe), for dynamic dims
    out_frame: tuple[int | None, ...]
    states: tuple[StatePair, ...]
    consts: dict[str, np.ndarray]  # fed on every call
    fixed_batch: int | None  # 1: the graph's batch is fixed at 1
    lstm: dict[str, int] | None  # {"layers", "hidden"} of our own LSTM; None for other models

    @classmethod
    def load(cls, model_dir: Path, intra_op_threads: int = 0) -> OnnxModel:
        import onnxruntime as ort

        manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(Path(model_dir) / manifest["onnx_file"]), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        if "states" not in manifest:
            return cls._from_format_1(session, manifest)
        x, y = manifest["input"], manifest["output"]
        return cls(
            session=session, name=manifest["name"], x_name=x["name"], y_name=y["name"], x_dtype=x["dtype"],
            vocab=None if x.get("vocab") is None else int(x["vocab"]), time_axis=bool(x["time_axis"]),
            frame=_frame(x.get("frame", ())), example=None if x.get("example") is None else tuple(x["example"]),
            out_frame=_frame(y.get("frame", ())),
            states=tuple(StatePair(s["input"], s["output"], s["dtype"], tuple(s["shape"])) for s in manifest["states"]),
            consts={c["name"]: np.array(c["value"], dtype=c["dtype"]).reshape(c["shape"])
                    for c in manifest.get("consts", ())},
            fixed_batch=manifest.get("fixed_batch"), lstm=manifest.get("lstm"),
        )  # fmt: skip

    @classmethod
    def _from_format_1(cls, session: Any, manifest: dict[str, Any]) -> OnnxModel:
        """A format-1 manifest: every tensor with its role, our LSTM's sizes beside them."""
        names = {t["role"]: t["name"] for t in manifest["inputs"] + manifest["outputs"]}
        tokens = manifest["input_kind"] == "tokens"
        size, layers, hidden = int(manifest["input_size"]), int(manifest["layers"]), int(manifest["hidden"])
        shape = (layers, BATCH, hidden)
        return cls(
            session=session, name=manifest["name"], x_name=names["input"], y_name=names["output"],
            x_dtype="int64" if tokens else "float32", vocab=size if tokens else None, time_axis=True,
            frame=() if tokens else (size,), example=None, out_frame=(int(manifest["output_size"]),),
            states=(StatePair(names["state_h"], names["next_state_h"], "float32", shape),
                    StatePair(names["state_c"], names["next_state_c"], "float32", shape)),
            consts={}, fixed_batch=None, lstm={"layers": layers, "hidden": hidden},
        )  # fmt: skip

    # -- what a step is --------------------------------------------------------------------------------

    @property
    def step_frame(self) -> tuple[int, ...]:
        """The frame every target is sent (see :func:`concrete_frame`)."""
        return concrete_frame(self.frame, self.example)

    @property
    def session_state_bytes(self) -> int:
        """One session's state, every tensor, in bytes: what the naive client carries each step."""
        return sum(s.session_bytes for s in self.states)

    def sample_input(self, rng: np.random.Generator, batch: int, t: int) -> np.ndarray:
        """Random x of a step: ``[B, T, *frame]`` token ids in the vocabulary, or normal values of x's dtype
        (a per-frame model's step too: :meth:`run` feeds its frames one at a time)."""
        shape = (batch, t, *self.step_frame)
        if self.vocab is not None:
            return rng.integers(0, self.vocab, size=shape, dtype=np.int64)
        return rng.standard_normal(shape, dtype=np.float32).astype(self.x_dtype, copy=False)

    def zero_states(self, batch: int) -> list[np.ndarray]:
        """Every state at zero, graph layout (the batch at its own axis), its own dtype."""
        return [np.zeros(s.graph_shape(batch), s.dtype) for s in self.states]

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step of ``x`` ([B, T, *frame]) from ``states``: (y [B, T, *out], the next states).

        A per-frame model runs the T frames one after another, each frame's next state fed to the next, as
        the server's engine does inside one turn.
        """
        outputs = [self.y_name, *(s.output for s in self.states)]
        if self.time_axis:
            y, *states = self.session.run(outputs, self._feeds(x, states))
            return y, states
        ys = []
        for t in range(x.shape[1]):
            y, *states = self.session.run(outputs, self._feeds(np.ascontiguousarray(x[:, t]), states))
            ys.append(y)  # [B, *out]
        return np.stack(ys, axis=1), states  # [B, T, *out]

    def _feeds(self, graph_x: np.ndarray, states: list[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {self.x_name: graph_x, **self.consts}
        feeds.update((s.input, state) for s, state in zip(self.states, states, strict=True))
        return feeds

    # -- what the report says about the model ---------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The model's contract for a report (JSON): enough to tell which model the figures are for."""
        return {
            "x": {"dtype": self.x_dtype, "time_axis": self.time_axis, "frame": list(self.frame),
                  "frame_sent": list(self.step_frame), "vocab": self.vocab},
            "y_frame": list(self.out_frame),
            "states": [{"input": s.input, "dtype": s.dtype, "shape": list(s.shape)} for s in self.states],
            "consts": sorted(self.consts),
            "fixed_batch": self.fixed_batch,
            "state_bytes_per_session": self.session_state_bytes,
        }  # fmt: skip


def concrete_frame(frame: tuple[int | None, ...], example: tuple[int, ...] | None) -> tuple[int, ...]:
    """A frame to send: the manifest's example where a dim is dynamic, else ``DYNAMIC_DIM``.

    The load generator, the naive server and raw onnxruntime must all run the same shapes, or the ratios
    between them compare different work.
    """
    if example is not None and len(example) == len(frame):
        return tuple(int(e) if d is None else d for d, e in zip(frame, example, strict=True))
    return tuple(DYNAMIC_DIM if d is None else d for d in frame)


def manifest_step_frame(model_dir: Path) -> tuple[int, ...]:
    """:func:`concrete_frame` of the model in ``model_dir`` (its manifest read as JSON, either format)."""
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    if "states" not in manifest:  # format 1: [T] token ids or [T, I] features
        return () if manifest["input_kind"] == "tokens" else (int(manifest["input_size"]),)
    x = manifest["input"]
    example = x.get("example")
    return concrete_frame(_frame(x.get("frame", ())), None if example is None else tuple(example))


def _frame(dims: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in dims)
