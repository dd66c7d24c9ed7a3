"""LSTMs as a user writes them in plain PyTorch, and plain ``torch.onnx.export`` calls (no cellserve code).

The names are ones cellserve never uses: ``inp``, ``h_in``, ``c_in`` → ``out``, ``h_out``, ``c_out``.
Each broken variant is one mistake a real export makes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

FEATURES, HIDDEN, LAYERS, OUT = 5, 16, 2, 3
INPUTS, OUTPUTS = ["inp", "h_in", "c_in"], ["out", "h_out", "c_out"]


def axes(*, inputs: list[str] = INPUTS, outputs: list[str] = OUTPUTS, state_axis: int = 1, time: bool = True) -> dict:
    """``dynamic_axes`` for torch.onnx.export: x and y batch (and time) first, the state's batch at ``state_axis``."""
    x = {0: "batch", 1: "time"} if time else {0: "batch"}
    return {inputs[0]: x, outputs[0]: x, **{n: {state_axis: "batch"} for n in (*inputs[1:], *outputs[1:])}}


DYNAMIC = axes()


class SensorLSTM(nn.Module):
    """A features model over sensor time series: [B, T, 5] → 2-layer LSTM (H=16) → [B, T, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, (h_out, c_out) = self.lstm(self.norm(inp), (h_in, c_in))  # seq [B, T, H]; h, c [L, B, H]
        return self.head(seq), h_out, c_out  # [B, T, 3]


class TokenLSTM(nn.Module):
    """A small language model: int64 ids [B, T] (vocabulary 40) → [B, T, 40] logits."""

    def __init__(self, vocab: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=1, batch_first=True)
        self.head = nn.Linear(12, vocab)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, (hn, cn) = self.lstm(self.embed(x), (h0, c0))
        return self.head(seq), hn, cn


class SwappedOutputs(SensorLSTM):
    """Returns (y, c, h): the next states in the other order than the state inputs."""

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, h, c = super().forward(inp, h_in, c_in)
        return y, c, h


class IgnoresState(SensorLSTM):
    """Takes h0/c0 but starts every call from zeros (the state inputs only feed a term multiplied by 0)."""

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, (h, c) = self.lstm(self.norm(inp))
        return self.head(seq), h + 0 * h_in, c + 0 * c_in


class BatchFirstState(SensorLSTM):
    """Takes and returns the state batch first, [B, L, H] (a common wrapper convention)."""

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = (h_in.transpose(0, 1).contiguous(), c_in.transpose(0, 1).contiguous())
        seq, (h, c) = self.lstm(self.norm(inp), state)
        return self.head(seq), h.transpose(0, 1), c.transpose(0, 1)


class SensorGRU(nn.Module):
    """A GRU: one state, no cell state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, h_out = self.gru(inp, h_in)
        return self.head(seq), h_out


class NoStateOut(SensorLSTM):
    """Takes the state but returns only y."""

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> torch.Tensor:
        return super().forward(inp, h_in, c_in)[0]


class OneStep(nn.Module):
    """An LSTMCell step: x [B, I], no time axis."""

    def __init__(self) -> None:
        super().__init__()
        self.cells = nn.LSTMCell(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, c = self.cells(inp, (h_in[0], c_in[0]))
        return self.head(h), h[None], c[None]


class Bidirectional(nn.Module):
    """A bidirectional LSTM: its state is [2L, B, H] and passes every shape check, but cannot be carried."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=1, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * HIDDEN, OUT)

    def forward(self, inp: torch.Tensor, h_in: torch.Tensor, c_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, (h, c) = self.lstm(inp, (h_in, c_in))
        return self.head(seq), h, c


def export(module: nn.Module, path: Path, *, layers: int = LAYERS, batch: int = 2, steps: int = 4,
           state_batch_first: bool = False, inputs: list[str] = INPUTS, outputs: list[str] = OUTPUTS,
           dynamic_axes: dict | None = DYNAMIC, one_step: bool = False) -> Path:  # fmt: skip
    """Plain ``torch.onnx.export`` of ``module`` on example inputs, as a user writes it."""
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(batch, FEATURES) if one_step else torch.randn(batch, steps, FEATURES)
    state = (batch, layers, HIDDEN) if state_batch_first else (layers, batch, HIDDEN)
    args = (x, *(torch.zeros(state) for _ in inputs[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)  # fmt: skip
    return path
