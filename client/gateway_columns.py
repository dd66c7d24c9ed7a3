"""A gateway's columnar inputs and outputs: the check of an ``[N, T, *frame]`` array (bad rows refused alone),
how many rows one message may carry, and the ``[N, T, *out]`` answer assembled in the caller's row order."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cellserve.client.errors import InvalidInputError
from cellserve.client.model_info import ModelInfo

DYNAMIC_GUESS = 64  # a dynamic output dimension's size, for estimating a message's bytes
ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4}


def check_columns(info: ModelInfo, x: object, n: int) -> tuple[np.ndarray, dict[int, InvalidInputError]]:
    """``x`` as a private ``[n, T, *frame]`` array of the model's input dtype, and the rows the model's input
    check refuses (token ids out of range, NaN or infinite features), each with its error.

    A wrong dtype or shape refuses the whole call (InvalidInputError, nothing sent): it is no one row's fault.
    """
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists, objects numpy cannot hold
        raise InvalidInputError(f"inputs are not a rectangular array of numbers ({e}); {_expected(info, n)}") from None
    kinds = "iu" if info.input_kind == "tokens" else "fiu"
    if a.dtype.kind not in kinds:
        raise InvalidInputError(f"inputs have dtype {a.dtype}; {_expected(info, n)}")
    frame = info.frame or ()
    fits = all(d >= 1 if w < 0 else d == w for d, w in zip(a.shape[2:], frame, strict=False))
    if a.ndim != 2 + len(frame) or a.shape[0] != n or a.shape[1] < 1 or not fits:
        raise InvalidInputError(f"inputs have shape {list(a.shape)}; {_expected(info, n)}")
    a = np.array(a, dtype=info.input_dtype, order="C", copy=True)  # kept for a replay: the caller may reuse x
    axes = tuple(range(1, a.ndim))
    if info.input_kind == "tokens":
        bad = np.flatnonzero(((a < 0) | (a >= info.input_size)).any(axis=axes))
        return a, {int(i): _refused(info, f"token id {_out_of_range(a[i], info)} is out of range") for i in bad}
    bad = np.flatnonzero(~np.isfinite(a).all(axis=axes))
    return a, {int(i): _refused(info, "input has NaN or infinite values") for i in bad}


def _out_of_range(row: np.ndarray, info: ModelInfo) -> int:
    lo, hi = int(row.min()), int(row.max())
    return lo if lo < 0 else hi


def _refused(info: ModelInfo, what: str) -> InvalidInputError:
    return InvalidInputError(f"{what}; {info.expected_input()}")


def _expected(info: ModelInfo, n: int) -> str:
    dims = "".join(f", {'F' if d < 0 else d}" for d in info.frame or ())
    return f"{n} keys take one [{n}, T{dims}] array (row i for keys[i], T >= 1); per row, {info.expected_input()}"


# A server's default max_message_bytes: a request whose answer would be larger is answered `error` as a whole (every
# key of it fails), so requests are split to keep answers within half of the server's limit and the client's.
SERVER_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def rows_per_message(info: ModelInfo, steps: int, max_message_bytes: int) -> int:
    """How many rows of ``steps`` steps one request may carry so that its answer (outputs, and a resume token
    per row when it checkpoints) stays within half of ``max_message_bytes`` (the client's) and of the server's
    limit: its ModelInfo's, or the default 4 MiB from a server that does not say."""
    max_message_bytes = min(max_message_bytes, info.max_message_bytes or SERVER_MAX_MESSAGE_BYTES)
    out = math.prod(d if d > 0 else DYNAMIC_GUESS for d in info.output_frame or ()) * 4 * steps
    inp = math.prod(d if d > 0 else DYNAMIC_GUESS for d in info.frame or ()) * ITEMSIZE.get(info.input_dtype, 8) * steps
    return max(1, (max_message_bytes // 2) // (max(out, inp) + token_bytes(info)))


def token_bytes(info: ModelInfo) -> int:
    """About the bytes of one session's resume token: its state tensors (batch axis 1), plus a header."""
    states = [t for t in info.inputs if t.role.startswith("state")]
    if not states:
        return 2 * info.layers * info.hidden * 4 + 256
    return sum(math.prod(abs(d) for d in t.shape if d > 0) * ITEMSIZE.get(t.dtype, 4) for t in states) + 256


def assemble(
    keys: Sequence[str], blocks: list[tuple[list[str], np.ndarray]], failed: Mapping[str, object], shape: tuple
) -> np.ndarray:
    """``[N, T, *out]`` in the order of ``keys`` from the answered blocks (each ``[n, T, *out]`` with its keys): an
    answer that already is that (one message, every row in order, none failed) as it came, else the rows
    gathered, zeros for the ``failed`` keys."""
    if len(blocks) == 1 and not failed and blocks[0][0] == list(keys):
        return blocks[0][1]
    if not blocks:
        return np.zeros(shape, np.float32)
    row = {key: i for i, key in enumerate(keys)}
    y = np.zeros((len(keys), *blocks[0][1].shape[1:]), blocks[0][1].dtype)
    for block_keys, block in blocks:
        for j, key in enumerate(block_keys):
            if key not in failed:
                y[row[key]] = block[j]
    return y
