"""One tiny PyTorch module per stateful-model class of issue 25, exported to ONNX as a user would export it.

Each ``build_<class>(tmp_dir) -> Path`` writes ``tmp_dir/<class>.onnx`` (same weights every call) and
:data:`MODELS` says, per class, what ``import_onnx`` / ``cellserve import-onnx`` needs beyond detection
(``import_kwargs`` / ``flags``) and what the import must detect. The serving tests import this module too:
keep the names stable.

Two exports leave shapes undeclared (dims with neither a value nor a name), as many exporters do:
``lstm_stacked`` (x's batch and time, the state's batch, every output dim) and ``per_frame`` (Silero-VAD
style: ``input [?, ?]``, ``state [2, ?, H]``, outputs unknown).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

FEATURES, HIDDEN, LAYERS, OUT = 5, 16, 2, 3
CONV_CHANNELS, CONV_CACHE = 4, 2  # three_state: conv over 4 channels, kernel 3, so a cache of 2 past steps
SAMPLE_RATE = 16000  # per_frame's constant input "sr"
FRAME_SAMPLES = 64  # per_frame: the example frame at export; the graph takes any length >= 5


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]] | None) -> Path:  # fmt: skip
    """Plain ``torch.onnx.export`` (TorchScript exporter), as a user writes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


def undeclare(path: Path, dims: dict[str, list[int] | None]) -> Path:
    """Clear the named graph inputs'/outputs' dims (``None``: all of them): neither a value nor a name."""
    model = onnx.load(str(path))
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in dims:
            axes = dims[vi.name]
            for i, d in enumerate(vi.type.tensor_type.shape.dim):
                if axes is None or i in axes:
                    d.Clear()
    onnx.save(model, str(path))
    return path


def _axes(batch: dict[str, int], time: tuple[str, ...] = ()) -> dict[str, dict[int, str]]:
    """dynamic_axes: each tensor's batch axis named "batch", axis 1 of the ``time`` tensors named "time"."""
    return {n: {a: "batch", **({1: "time"} if n in time else {})} for n, a in batch.items()}


# -- the modules ------------------------------------------------------------------------------------------


class GRUNet(nn.Module):
    """x [B, T, 5] -> 2-layer GRU (H=16) -> y [B, T, 3]; one state h [L, B, H]."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, hn = self.gru(x, h0)  # seq [B, T, H]; hn [L, B, H]
        return self.head(seq), hn  # [B, T, 3]


class BatchFirstLSTM(nn.Module):
    """An LSTM whose state goes in and out batch first, [B, L, H] (a common wrapper convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = (h_in.transpose(0, 1).contiguous(), c_in.transpose(0, 1).contiguous())  # [L, B, H]
        seq, (h, c) = self.lstm(inp, state)  # seq [B, T, H]
        return self.head(seq), h.transpose(0, 1), c.transpose(0, 1)  # [B, T, 3], [B, L, H], [B, L, H]


class StackedLSTM(nn.Module):
    """An LSTM whose h and c travel stacked in one tensor, [2, L, B, H]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, (h, c) = self.lstm(x, (state[0], state[1]))  # seq [B, T, H]; h, c [L, B, H]
        return self.head(seq), torch.stack([h, c])  # [B, T, 3], [2, L, B, H]


class FrameVAD(nn.Module):
    """A per-frame streaming audio model (Silero-VAD shaped): one frame of samples per call, no time axis.

    input [B, N] (N any length >= 5) -> conv front end -> mean over the frame -> scaled by sr/16000 ->
    LSTMCell with one combined state [2, B, H] -> output [B, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, kernel_size=5, stride=2)
        self.cell = nn.LSTMCell(8, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, input: torch.Tensor, state: torch.Tensor, sr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat = torch.relu(self.conv(input.unsqueeze(1))).mean(-1)  # [B, 1, N] -> [B, 8, N'] -> [B, 8]
        feat = feat * (sr.float() / SAMPLE_RATE) + (sr.float() / SAMPLE_RATE)  # the sample rate changes y
        h, c = self.cell(feat, (state[0], state[1]))  # [B, H] each
        return torch.sigmoid(self.head(h)), torch.stack([h, c])  # [B, 1], [2, B, H]


class ConvCacheLSTM(nn.Module):
    """A streaming causal conv (cache [B, C, K] of the last K inputs) then an LSTM (h, c [1, B, H])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(CONV_CHANNELS, 8, kernel_size=CONV_CACHE + 1)
        self.lstm = nn.LSTM(8, HIDDEN, num_layers=1, batch_first=True)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, h0: torch.Tensor,
                c0: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        full = torch.cat([cache, x.transpose(1, 2)], dim=2)  # [B, C, K + T]
        conv = torch.relu(self.conv(full)).transpose(1, 2)  # [B, T, 8]
        seq, (hn, cn) = self.lstm(conv, (h0, c0))  # [B, T, H]
        return self.head(seq), full[:, :, -CONV_CACHE:], hn, cn  # [B, T, 3], [B, C, K], [1, B, H] x2


class PlainLSTM(nn.Module):
    """x [B, T, 5] -> 2-layer LSTM -> y [B, T, 3], state h, c [L, B, H]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, (hn, cn) = self.lstm(x, (h, c))
        return self.head(seq), hn, cn


class HalfStateLSTM(PlainLSTM):
    """Keeps its state as float16 (h_0, c_0 -> h_n, c_n [L, B, H]); computes in float32 inside."""

    def forward(self, x: torch.Tensor, h_0: torch.Tensor, c_0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, hn, cn = super().forward(x, h_0.float(), c_0.float())
        return y, hn.half(), cn.half()  # [B, T, 3] float32, [L, B, H] float16 x2


# -- builders: tmp_dir -> the .onnx -----------------------------------------------------------------------


def _feats(batch: int = 2, steps: int = 4, width: int = FEATURES) -> torch.Tensor:
    return torch.randn(batch, steps, width)


def build_gru(tmp_dir: Path) -> Path:
    """GRU: x [B, T, 5], h0 [2, B, 16] -> y [B, T, 3], hn. Names and axes declared."""
    torch.manual_seed(0)
    args = (_feats(), torch.zeros(LAYERS, 2, HIDDEN))
    return _export(GRUNet(), args, Path(tmp_dir) / "gru.onnx", ["x", "h0"], ["y", "hn"],
                   _axes({"x": 0, "y": 0, "h0": 1, "hn": 1}, time=("x", "y")))  # fmt: skip


def build_lstm_batch_first(tmp_dir: Path) -> Path:
    """LSTM, state batch first: inp [B, T, 5], h_in, c_in [B, 2, 16] -> out [B, T, 3], h_out, c_out."""
    torch.manual_seed(0)
    args = (_feats(), torch.zeros(2, LAYERS, HIDDEN), torch.zeros(2, LAYERS, HIDDEN))
    names = ["inp", "h_in", "c_in"], ["out", "h_out", "c_out"]
    return _export(BatchFirstLSTM(), args, Path(tmp_dir) / "lstm_batch_first.onnx", *names,
                   _axes(dict.fromkeys((*names[0], *names[1]), 0), time=("inp", "out")))  # fmt: skip


def build_lstm_stacked(tmp_dir: Path) -> Path:
    """LSTM, h and c stacked: x [?, ?, 5], state [2, 2, ?, 16] -> y, stateN (shapes left undeclared)."""
    torch.manual_seed(0)
    path = _export(StackedLSTM(), (_feats(), torch.zeros(2, LAYERS, 2, HIDDEN)), Path(tmp_dir) / "lstm_stacked.onnx",
                   ["x", "state"], ["y", "stateN"],
                   _axes({"x": 0, "y": 0, "state": 2, "stateN": 2}, time=("x", "y")))  # fmt: skip
    return undeclare(path, {"x": [0, 1], "state": [2], "y": None, "stateN": None})


def build_per_frame(tmp_dir: Path) -> Path:
    """Per-frame audio model: input [?, ?] samples, state [2, ?, 16], sr int64 [] -> output, stateN (undeclared)."""
    torch.manual_seed(0)
    args = (torch.randn(2, FRAME_SAMPLES), torch.zeros(2, 2, HIDDEN), torch.tensor(SAMPLE_RATE))
    path = _export(FrameVAD(), args, Path(tmp_dir) / "per_frame.onnx", ["input", "state", "sr"], ["output", "stateN"],
                   {"input": {0: "batch", 1: "samples"}, "state": {1: "batch"}, "output": {0: "batch"},
                    "stateN": {1: "batch"}})  # fmt: skip
    return undeclare(path, {"input": None, "state": [1], "output": None, "stateN": None})


def build_three_state(tmp_dir: Path) -> Path:
    """Conv cache beside h and c: x [B, T, 4], cache [B, 4, 2], h0, c0 [1, B, 16] -> y, new_cache, hn, cn."""
    torch.manual_seed(0)
    args = (_feats(width=CONV_CHANNELS), torch.zeros(2, CONV_CHANNELS, CONV_CACHE), torch.zeros(1, 2, HIDDEN),
            torch.zeros(1, 2, HIDDEN))  # fmt: skip
    batch = {"x": 0, "y": 0, "cache": 0, "new_cache": 0, "h0": 1, "c0": 1, "hn": 1, "cn": 1}
    return _export(ConvCacheLSTM(), args, Path(tmp_dir) / "three_state.onnx", ["x", "cache", "h0", "c0"],
                   ["y", "new_cache", "hn", "cn"], _axes(batch, time=("x", "y")))  # fmt: skip


def build_fixed_batch(tmp_dir: Path) -> Path:
    """Batch fixed at 1: x [1, T, 5], h, c [2, 1, 16] -> y [1, T, 3], h_n, c_n (only time is dynamic)."""
    torch.manual_seed(0)
    args = (_feats(batch=1), torch.zeros(LAYERS, 1, HIDDEN), torch.zeros(LAYERS, 1, HIDDEN))
    return _export(PlainLSTM(), args, Path(tmp_dir) / "fixed_batch.onnx", ["x", "h", "c"], ["y", "h_n", "c_n"],
                   {"x": {1: "time"}, "y": {1: "time"}})  # fmt: skip


def build_fp16_state(tmp_dir: Path) -> Path:
    """float16 state: x float32 [B, T, 5], h_0, c_0 float16 [2, B, 16] -> y float32 [B, T, 3], h_n, c_n."""
    torch.manual_seed(0)
    half = torch.zeros(LAYERS, 2, HIDDEN, dtype=torch.float16)
    return _export(HalfStateLSTM(), (_feats(), half, half), Path(tmp_dir) / "fp16_state.onnx",
                   ["x", "h_0", "c_0"], ["y", "h_n", "c_n"],
                   _axes({"x": 0, "y": 0, "h_0": 1, "c_0": 1, "h_n": 1, "c_n": 1}, time=("x", "y")))  # fmt: skip


# -- what importing each needs, and what it must detect ----------------------------------------------------


@dataclass(frozen=True)
class StateModel:
    """One class: its builder, what import needs beyond detection, and the contract it must come out with."""

    build: Callable[[Path], Path]
    import_kwargs: dict[str, Any]  # extra keyword arguments of cellserve.model.importer.import_onnx
    flags: tuple[str, ...]  # the same as `cellserve import-onnx` flags
    x: str  # the graph's names for x and y
    y: str
    time_axis: bool
    frame: tuple[int | None, ...]  # x's frame (None: dynamic)
    out_frame: tuple[int | None, ...]
    states: tuple[tuple[str, str, str, tuple[int | str, ...]], ...]  # (in, out, dtype, shape with "B")
    consts: dict[str, tuple[str, tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)
    fixed_batch: int | None = None
    x_dtype: str = "float32"


_LSTM = (LAYERS, "B", HIDDEN)
MODELS: dict[str, StateModel] = {
    "gru": StateModel(build_gru, {}, (), "x", "y", True, (FEATURES,), (OUT,),
                      (("h0", "hn", "float32", _LSTM),)),
    "lstm_batch_first": StateModel(build_lstm_batch_first, {}, (), "inp", "out", True, (FEATURES,), (OUT,),
                                   (("h_in", "h_out", "float32", ("B", LAYERS, HIDDEN)),
                                    ("c_in", "c_out", "float32", ("B", LAYERS, HIDDEN)))),
    "lstm_stacked": StateModel(build_lstm_stacked, {}, (), "x", "y", True, (FEATURES,), (OUT,),
                               (("state", "stateN", "float32", (2, LAYERS, "B", HIDDEN)),)),
    "per_frame": StateModel(build_per_frame, {"consts": {"sr": str(SAMPLE_RATE)}}, ("--const", f"sr={SAMPLE_RATE}"),
                            "input", "output", False, (None,), (1,),
                            (("state", "stateN", "float32", (2, "B", HIDDEN)),),
                            {"sr": ("int64", (), (SAMPLE_RATE,))}),
    "three_state": StateModel(build_three_state, {}, (), "x", "y", True, (CONV_CHANNELS,), (OUT,),
                              (("cache", "new_cache", "float32", ("B", CONV_CHANNELS, CONV_CACHE)),
                               ("h0", "hn", "float32", (1, "B", HIDDEN)), ("c0", "cn", "float32", (1, "B", HIDDEN)))),
    "fixed_batch": StateModel(build_fixed_batch, {}, (), "x", "y", True, (FEATURES,), (OUT,),
                              (("h", "h_n", "float32", _LSTM), ("c", "c_n", "float32", _LSTM)), fixed_batch=1),
    "fp16_state": StateModel(build_fp16_state, {}, (), "x", "y", True, (FEATURES,), (OUT,),
                             (("h_0", "h_n", "float16", _LSTM), ("c_0", "c_n", "float16", _LSTM))),
}  # fmt: skip
