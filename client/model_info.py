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

    @classmethod
    def from_proto(cls, m: pb.ModelSummary) -> ModelInfo:
        def spec(t: pb.TensorSpec) -> TensorSpec:
            dtype = DTYPES[t.dtype].name if t.dtype in DTYPES else "unspecified"
            return TensorSpec(t.name, t.role, dtype, tuple(int(d) for d in t.shape))

        return cls(
            **{f: getattr(m, f) for f in SUMMARY_FIELDS},
            inputs=tuple(spec(t) for t in m.inputs),
            outputs=tuple(spec(t) for t in m.outputs),
        )

    def check_input(self, x: object) -> np.ndarray:
        """Return ``x`` as the array a step sends ([T] int64 or [T, I] float32); InvalidInputError if it can't be.

        A single step may be given without its T axis (a scalar token id, or an [I] feature vector). A token
        model also takes ``bytes``/``bytearray``: each byte is one token id (``b"def "`` = ``list(b"def ")``).
        """
        expected = self.expected_input()
        if self.input_kind == "tokens" and isinstance(x, (bytes, bytearray)):
            a = np.frombuffer(x, np.uint8)
        elif x is None or isinstance(x, (str, bytes, bytearray)):
            raise InvalidInputError(f"{self._python_input(x)}; {expected}")
        else:
            try:
                a = np.asarray(x)
            except (ValueError, TypeError) as e:  # ragged nested lists, objects numpy cannot hold
                raise InvalidInputError(f"input is not a rectangular array of numbers ({e}); {expected}") from None
            if a.dtype.kind in "OSUV":  # objects, strings, records: not numbers numpy could convert
                raise InvalidInputError(f"input of Python type {type(x).__name__} is not numbers (numpy reads it "
                                        f"as dtype {a.dtype}); {expected}")  # fmt: skip
        if a.size == 0:
            raise InvalidInputError(f"input is empty (shape {list(a.shape)}); {expected}")
        if self.input_kind == "tokens":
            return self._check_tokens(a, expected)
        return self._check_features(a, expected)

    def expected_input(self) -> str:
        """What a step of this model takes, for error messages."""
        if self.input_kind == "tokens":
            return f"model {self.name!r} expects integer token ids in [0, {self.input_size}), int64 [T] with T >= 1"
        return f"model {self.name!r} expects finite float32 features [T, {self.input_size}] with T >= 1"

    def _python_input(self, x: str | bytes | bytearray | None) -> str:
        """What a step's input is, when it is a Python value that is not numbers (None, a str, bytes)."""
        if x is None:
            return "input is None"
        if isinstance(x, str) and self.input_kind == "tokens":
            example = repr(x) if len(x) <= 16 else "text"
            return f"input is a str; encode it first, e.g. list({example}.encode()) (one token id per UTF-8 byte)"
        return f"input has Python type {type(x).__name__} (length {len(x)}), not numbers"

    def _check_tokens(self, a: np.ndarray, expected: str) -> np.ndarray:
        if a.dtype.kind not in "iu":
            raise InvalidInputError(f"input has dtype {a.dtype}; {expected}")
        if a.ndim == 0:
            a = a.reshape(1)
        if a.ndim != 1:
            raise InvalidInputError(f"input has shape {list(a.shape)}; {expected}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.input_size:
            bad = lo if lo < 0 else hi
            raise InvalidInputError(f"token id {bad} is out of range; {expected}")
        return a.astype(np.int64, copy=False)

    def _check_features(self, a: np.ndarray, expected: str) -> np.ndarray:
        if a.dtype.kind not in "fiu":
            raise InvalidInputError(f"input has dtype {a.dtype}; {expected}")
        if a.ndim == 1 and a.shape[0] != self.input_size:
            raise InvalidInputError(f"input has shape {list(a.shape)} (a 1-D input is read as one step of "
                                    f"{a.shape[0]} features); {expected}")  # fmt: skip
        if a.ndim == 1:
            a = a.reshape(1, -1)
        if a.ndim != 2 or a.shape[1] != self.input_size:
            raise InvalidInputError(f"input has shape {list(a.shape)}; {expected}")
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise InvalidInputError(f"input has NaN or infinite values; {expected}")
        return a
