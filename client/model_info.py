"""What the client knows about a served model (from ``ListModels``/``ModelInfo``) and its input check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellserve.client.errors import InvalidInputError
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.wire import DTYPES, SUMMARY_FIELDS


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: str
    dtype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension


@dataclass(frozen=True)
class ModelInfo:
    """A served model's description. ``check_input`` validates a step's input before it is sent."""

    # the ModelSummary's scalar fields (cellserve.wire.SUMMARY_FIELDS), then its tensors
    name: str
    version: str
    sha256: str
    input_kind: str  # "tokens" (int64 ids) or "features" (float32 vectors)
    layers: int
    hidden: int
    input_size: int
    output_size: int
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    input_dtype: str = ""  # a step's dtype: int64 (tokens), float32 or float16 ("": from input_kind)
    frame: tuple[int, ...] | None = None  # a step's dims after T, -1 dynamic (None: from input_kind, input_size)
    time_axis: bool = True  # False: a per-frame model (the server runs a step's T frames in order)
    output_frame: tuple[int, ...] | None = None  # an output step's dims after T (None: [output_size])
    example_frame: tuple[int, ...] | None = None  # a frame the model runs: dynamic dims filled in (None: frame)
    max_message_bytes: int = 0  # the server's limit on one gRPC message (0: not said, an older server)

    def __post_init__(self) -> None:  # an older server's summary, or a hand-made ModelInfo: tokens [T] or [T, I]
        tokens = self.input_kind == "tokens"
        if not self.input_dtype:
            object.__setattr__(self, "input_dtype", "int64" if tokens else "float32")
        if self.frame is None:
            object.__setattr__(self, "frame", () if tokens else (self.input_size,))
        if self.output_frame is None:
            object.__setattr__(self, "output_frame", (self.output_size,))
        if self.example_frame is None:
            object.__setattr__(self, "example_frame", tuple(d if d > 0 else 64 for d in self.frame or ()))

    @classmethod
    def from_proto(cls, m: pb.ModelSummary) -> ModelInfo:
        def spec(t: pb.TensorSpec) -> TensorSpec:
            dtype = DTYPES[t.dtype].name if t.dtype in DTYPES else "unspecified"
            return TensorSpec(t.name, t.role, dtype, tuple(int(d) for d in t.shape))

        new = m.input_dtype in DTYPES  # an older server sends no frame fields (tokens [T] or features [T, I])
        return cls(
            **{f: getattr(m, f) for f in SUMMARY_FIELDS},
            inputs=tuple(spec(t) for t in m.inputs),
            outputs=tuple(spec(t) for t in m.outputs),
            input_dtype=DTYPES[m.input_dtype].name if new else "",
            frame=tuple(int(d) for d in m.frame) if new else None,
            time_axis=m.time_axis if new else True,
            output_frame=tuple(int(d) for d in m.output_frame) if new else None,
            example_frame=tuple(int(d) for d in m.example_frame) if new and m.example_frame else None,
            max_message_bytes=m.max_message_bytes,
        )

    def check_input(self, x: object) -> np.ndarray:
        """Return ``x`` as the array a step sends ([T] int64 token ids, or [T, *frame] of the model's dtype);
        InvalidInputError if it can't be.

        A single step may be given without its T axis (a scalar token id, or one [*frame]). A token
        model also takes ``bytes``/``bytearray``: each byte is one token id (``b"def "`` = ``list(b"def ")``).
        """
        if self.input_kind == "tokens" and isinstance(x, (bytes, bytearray)):
            a = np.frombuffer(x, np.uint8)
        elif x is None or isinstance(x, (str, bytes, bytearray)):
            raise self._refuse(self._python_input(x))
        else:
            try:
                a = np.asarray(x)
            except (ValueError, TypeError) as e:  # ragged nested lists, objects numpy cannot hold
                raise self._refuse(f"input is not a rectangular array of numbers ({e})") from None
            if a.dtype.kind in "OSUV":  # objects, strings, records: not numbers numpy could convert
                raise self._refuse(f"input of Python type {type(x).__name__} is not numbers (numpy reads it "
                                   f"as dtype {a.dtype})")  # fmt: skip
        if a.size == 0:
            raise self._refuse(f"input is empty (shape {list(a.shape)})")
        if self.input_kind == "tokens":
            return self._check_tokens(a)
        return self._check_features(a)

    def expected_input(self) -> str:
        """What a step of this model takes, for error messages (built only when one is raised)."""
        if self.input_kind == "tokens":
            return f"model {self.name!r} expects integer token ids in [0, {self.input_size}), int64 [T] with T >= 1"
        dims = "".join(f", {'N' if d < 0 else d}" for d in self.frame or ())
        what = "features" if self.time_axis else "frames"
        return f"model {self.name!r} expects finite {self.input_dtype} {what} [T{dims}] with T >= 1"

    def _fits(self, dims: tuple[int, ...]) -> bool:
        return all(d >= 1 if w < 0 else d == w for d, w in zip(dims, self.frame or (), strict=True))

    def _refuse(self, what: str) -> InvalidInputError:
        """``what`` was wrong, and what the model expects (built only when a step is refused)."""
        return InvalidInputError(f"{what}; {self.expected_input()}")

    def _python_input(self, x: str | bytes | bytearray | None) -> str:
        """What a step's input is, when it is a Python value that is not numbers (None, a str, bytes)."""
        if x is None:
            return "input is None"
        if isinstance(x, str) and self.input_kind == "tokens":
            example = repr(x) if len(x) <= 16 else "text"
            return f"input is a str; encode it first, e.g. list({example}.encode()) (one token id per UTF-8 byte)"
        return f"input has Python type {type(x).__name__} (length {len(x)}), not numbers"

    def _check_tokens(self, a: np.ndarray) -> np.ndarray:
        if a.dtype.kind not in "iu":
            raise self._refuse(f"input has dtype {a.dtype}")
        if a.ndim == 0:
            a = a.reshape(1)
        if a.ndim != 1:
            raise self._refuse(f"input has shape {list(a.shape)}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.input_size:
            bad = lo if lo < 0 else hi
            raise self._refuse(f"token id {bad} is out of range")
        return a.astype(np.int64, copy=False)

    def _check_features(self, a: np.ndarray) -> np.ndarray:
        if a.dtype.kind not in "fiu":
            raise self._refuse(f"input has dtype {a.dtype}")
        frame = self.frame or ()
        if a.ndim == len(frame):  # one step without its T axis
            if not self._fits(a.shape):
                raise self._refuse(f"input has shape {list(a.shape)} (a {a.ndim}-D input is read as one step of "
                                   f"{a.shape[0] if a.ndim == 1 else list(a.shape)} features)")  # fmt: skip
            a = a.reshape(1, *a.shape)
        if a.ndim != len(frame) + 1 or not self._fits(a.shape[1:]):
            raise self._refuse(f"input has shape {list(a.shape)}")
        a = a.astype(self.input_dtype, copy=False)
        if not np.isfinite(a).all():
            raise self._refuse("input has NaN or infinite values")
        return a
