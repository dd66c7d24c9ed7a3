"""The checks of a model manifest: the bounds of its sizes (each from what has to hold it) and its internal
consistency, raising :class:`ManifestError` with one line a user can act on. Pure Python, as ``manifest.py``."""

from __future__ import annotations

import math
import operator
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from cellserve.model.tensor_specs import CONST_DTYPES, MAX_CONST_VALUES, MAX_SESSION_STATE, STATE_DTYPES, X_DTYPES

if TYPE_CHECKING:
    from cellserve.model.manifest import Manifest


class ManifestError(ValueError):
    """A model directory is missing, malformed, or does not match its manifest."""


# Bounds of a manifest's sizes, each from what has to hold them: a hand-edited absurd value fails in one line
# at load, not as a MemoryError when the server sizes its state pool (layers × capacity × hidden floats).
MAX_STATE_FLOATS = 2**28  # layers × hidden: h and c as float32 (8 bytes per pair) in one 2 GiB message
DIM_LIMITS: dict[str, int] = {
    "layers": 2**16 - 1,  # a resume token stores layers as u16
    "hidden": MAX_STATE_FLOATS,
    "input_size": 2**29,  # one step of float32 features in one 2 GiB message; a vocabulary fits too
    "output_size": 2**29,  # one step of float32 output in one 2 GiB message
}
DIM_REASONS = {
    "layers": "a resume token stores it in 16 bits",
    "hidden": "h and c of a session travel in one resume token, at most 2 GiB",
    "input_size": "one step's float32 features must fit one gRPC message, at most 2 GiB",
    "output_size": "one step's float32 output must fit one gRPC message, at most 2 GiB",
}


def _is_int(value: object) -> bool:
    """An integer (Python's or numpy's), not a bool, float or string."""
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return not isinstance(value, bool)


def check_onnx_file(onnx_file: object) -> None:
    """``onnx_file`` must be a plain relative path (no ``..``, not absolute): the graph lives in its model directory."""
    if not isinstance(onnx_file, str) or not onnx_file:
        raise ManifestError(f"manifest field onnx_file is {onnx_file!r}; give the ONNX file's name, e.g. 'model.onnx'")
    posix, windows = PurePosixPath(onnx_file), PureWindowsPath(onnx_file)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts or "\0" in onnx_file:
        raise ManifestError(
            f"manifest field onnx_file is {onnx_file!r}; it must be a relative path inside the model directory "
            "(no '..', not absolute), e.g. 'model.onnx'"
        )


def validate(self: Manifest) -> None:
    """Check internal consistency: names unique, dtypes known, sizes positive and bounded."""
    x, y = self.input, self.output
    _check(x.dtype in X_DTYPES, f"input {x.name!r} has dtype {x.dtype!r}; x must be one of {X_DTYPES}")
    _check(isinstance(x.time_axis, bool), "input.time_axis must be true or false")
    for what, frame in (("input", x.frame), ("output", y.frame)):
        bad = f"manifest {what} frame dims {list(frame)}: each must be null (dynamic) or in 1..2**29"
        for d in frame:
            _check(d is None or (_is_int(d) and 1 <= d <= 2**29), bad)
    _check(len(x.frame) <= 6 and len(y.frame) <= 6, "a frame has at most 6 dims")
    if x.vocab is not None:
        _check(x.dtype == "int64", f"input {x.name!r}: a vocabulary needs int64 token ids, not {x.dtype}")
        most = DIM_LIMITS["input_size"]
        _check(_is_int(x.vocab) and 1 <= x.vocab <= most,
               f"manifest field vocab is {x.vocab!r}; it must be an integer in 1..{most}")  # fmt: skip
    if self.lstm is not None:
        for key in ("layers", "hidden"):
            value = self.lstm.get(key)
            most = DIM_LIMITS[key]
            _check(_is_int(value) and 1 <= value <= most, _bad_size(key, value))  # type: ignore[operator]
        if self.layers * self.hidden > MAX_STATE_FLOATS:
            raise ManifestError(
                f"manifest fields layers × hidden are {self.layers} × {self.hidden}; a session's h and c would "
                f"be {8 * self.layers * self.hidden} bytes, and a resume token carrying them must fit one gRPC "
                f"message (at most 2 GiB): layers × hidden must be at most {MAX_STATE_FLOATS}"
            )
    _check(bool(self.states), f"model {self.name!r} has no state pair; cellserve serves stateful models")
    for s in self.states:
        _check(s.dtype in STATE_DTYPES, f"state {s.input!r} has dtype {s.dtype!r}; states are {STATE_DTYPES}")
        shape = list(s.shape)
        _check(shape.count("B") == 1, f"state {s.input!r} has shape {shape}; it needs exactly one batch axis 'B'")
        _check(all(d == "B" or (_is_int(d) and d >= 1) for d in shape),
               f"state {s.input!r} has shape {shape}; every dim but 'B' must be a fixed size >= 1")  # fmt: skip
    _check(self.state_elements <= MAX_SESSION_STATE,
           f"one session's state would be {self.state_elements} elements; at most {MAX_SESSION_STATE} fit a "
           "resume token (one gRPC message, 2 GiB)")  # fmt: skip
    for c in self.consts:
        _check(c.dtype in CONST_DTYPES, f"constant {c.name!r} has dtype {c.dtype!r}; one of {CONST_DTYPES}")
        _check(all(_is_int(d) and d >= 0 for d in c.shape) and len(c.value) == math.prod(c.shape)
               and len(c.value) <= MAX_CONST_VALUES,
               f"constant {c.name!r}: shape {list(c.shape)} and {len(c.value)} values disagree (at most "
               f"{MAX_CONST_VALUES} values)")  # fmt: skip
    names = [x.name, y.name, *(s.input for s in self.states), *(s.output for s in self.states),
             *(c.name for c in self.consts)]  # fmt: skip
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"manifest of model {self.name!r} names {dup} twice; every graph tensor has one role")
    _check(self.fixed_batch in (None, 1), f"fixed_batch is {self.fixed_batch!r}; null (dynamic) or 1")
    check_onnx_file(self.onnx_file)
    if not isinstance(self.provenance, dict) or not isinstance(self.provenance.get("kind", ""), str):
        raise ManifestError("manifest field provenance must be an object with a string 'kind'")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ManifestError(message)


def _bad_size(key: str, value: object) -> str:
    return f"manifest field {key} is {value!r}; it must be an integer in 1..{DIM_LIMITS[key]} ({DIM_REASONS[key]})"
