"""The tensors of the general contract, one description each: the per-step input, the output, a state pair,
a constant input (format 2), and the role-tagged graph tensors of format 1 and of ``Manifest.inputs``.

Pure Python (no torch, no onnxruntime); :mod:`cellserve.model.manifest` puts them together and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["input", "state_h", "state_c", "output", "next_state_h", "next_state_c"]


@dataclass(frozen=True)
class TensorInfo:
    """One ONNX graph input or output. ``shape`` uses strings for dynamic axes ("B", "T")."""

    name: str
    role: Role
    dtype: str  # numpy dtype name: "int64", "float32"
    shape: list[int | str]


@dataclass(frozen=True)
class TensorNames:
    """An LSTM-shaped model's tensor names by role: ``(x, h0, c0) -> (y, hn, cn)``."""

    x: str
    h0: str
    c0: str
    y: str
    hn: str
    cn: str


Frame = tuple[int | None, ...]  # one step's dims after the batch (and time) axis; None: dynamic
X_DTYPES = ("int64", "float32", "float16")
STATE_DTYPES = ("float32", "float16")
CONST_DTYPES = ("int64", "int32", "float32", "float16", "bool")
MAX_SESSION_STATE = 2**28  # elements of one session's state, all tensors: a resume token fits one 2 GiB message
MAX_CONST_VALUES = 4096  # a constant input is a scalar or a short list (a sample rate, a threshold)


@dataclass(frozen=True)
class InputSpec:
    """The per-step input ``x``: ``[B, T, *frame]`` (time axis) or ``[B, *frame]`` (a per-frame model).

    A step always carries ``[T, *frame]``; a per-frame model runs its T frames one after another.
    """

    name: str
    dtype: str  # int64 (token ids, checked against vocab) | float32 | float16 (finite)
    time_axis: bool
    frame: Frame = ()
    vocab: int | None = None  # int64 inputs: ids in [0, vocab)
    example: tuple[int, ...] | None = None  # a frame the graph runs (import's probe), for a frame with dynamic dims

    @property
    def example_shape(self) -> tuple[int, ...]:
        """A concrete frame shape: the example, else the frame with dynamic dims as 1."""
        return self.example if self.example is not None else tuple(d or 1 for d in self.frame)


@dataclass(frozen=True)
class OutputSpec:
    """The per-step output ``y``: ``[B, T, *frame]`` or ``[B, *frame]``; served as float32 ``[T, *frame]``."""

    name: str
    dtype: str
    frame: Frame = ()


@dataclass(frozen=True)
class StateSpec:
    """One state pair: graph input ``input`` is fed the session's state, graph output ``output`` is its next state.

    ``shape`` is the graph's, with ``"B"`` at the batch axis (any position) and fixed sizes elsewhere.
    """

    input: str
    output: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def batch_axis(self) -> int:
        return self.shape.index("B")

    @property
    def session_shape(self) -> tuple[int, ...]:
        """One session's state: the graph shape without its batch axis."""
        return tuple(int(d) for d in self.shape if d != "B")

    def graph_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "B" else int(d) for d in self.shape)


@dataclass(frozen=True)
class ConstSpec:
    """A graph input fixed when the model was imported (e.g. a sample rate), fed on every call."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    value: tuple[float, ...]  # row-major


def frame_of(dims: Any) -> Frame:
    """A manifest's frame list as a Frame (null: dynamic)."""
    return tuple(None if d is None else int(d) for d in dims)
