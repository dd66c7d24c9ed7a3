"""A request's tensors checked against the model: names, datatypes, shapes, and what fits a reply.

Per-row checks (vocabulary, NaN) are the model's own (:meth:`LoadedModel.check_input`); shapes are
described in :mod:`cellserve.server.oip`.
"""

from __future__ import annotations

import math

import numpy as np

from cellserve.model.manifest import Manifest
from cellserve.server.errors import InvalidArgument
from cellserve.server.models import LoadedModel
from cellserve.server.oip.tensors import datatype_of, tensor_datatype


def x_dims(m: Manifest) -> list[int]:
    """x's per-request dims after the batch: ``[T, *frame]`` (time axis) or ``[*frame]``; -1 where dynamic."""
    frame = [-1 if d is None else d for d in m.input.frame]
    return [-1, *frame] if m.input.time_axis else frame


def y_dims(m: Manifest) -> list[int]:
    frame = [-1 if d is None else d for d in m.output.frame]
    return [-1, *frame] if m.input.time_axis else frame


def split_inputs(
    model: LoadedModel, tensors: dict[str, np.ndarray], *, sequence: bool
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Check a request's inputs against the model; returns x ``[B, T, *frame]`` (a per-frame model's one frame
    as T=1) and each state's explicit value ``[B, *state]`` (batch first) or None.

    B is at most the model's scheduler's ``max_batch`` (smaller for a fixed-batch graph), or 1 for a sequence.
    """
    m = model.manifest
    max_batch = model.scheduler.max_batch
    state_names = [s.input for s in m.states]
    for name in tensors:
        if name != m.input.name and name not in state_names:
            known = ", ".join([m.input.name, *state_names])
            raise InvalidArgument(f"unexpected inference input '{name}' for model '{m.name}'; inputs are {known}")
    x = tensors.get(m.input.name)
    if x is None:
        raise InvalidArgument(f"expected input '{m.input.name}' for model '{m.name}' is missing")
    _check_dtype(m, m.input.name, x)
    want = [-1, *x_dims(m)]
    batch_ok = 1 <= (x.shape[0] if x.ndim else 0) <= (1 if sequence else max_batch)
    if x.ndim != len(want) or any(w not in (-1, d) for w, d in zip(want, x.shape, strict=True)) or not batch_ok:
        batch = "1 (a sequence request carries one sequence)" if sequence else f"1..{max_batch} (max_batch_size)"
        then = ", then T steps" if m.input.time_axis else ", then one frame"
        raise InvalidArgument(
            f"unexpected shape for input '{m.input.name}' for model '{m.name}'. Expected {want}, got "
            f"{list(x.shape)}; the first dimension is the batch ({batch}){then}"
        )
    if not m.input.time_axis:
        x = x[:, None]  # one frame: T=1
    if not 1 <= x.shape[1] <= model.max_steps:
        raise InvalidArgument(
            f"input '{m.input.name}' has T={x.shape[1]} steps; model '{m.name}' takes 1..{model.max_steps}"
        )
    batch, steps = x.shape[:2]
    state_floats = 0 if sequence else m.state_elements
    reply_floats = batch * (steps * (m.output_elements or 1) + state_floats)  # y (+ every state)
    if reply_floats > model.max_output_steps * (m.output_elements or 1):  # what fits one message
        raise InvalidArgument(
            f"the reply to {batch} row(s) of T={steps} steps would be {4 * reply_floats} bytes of outputs, "
            f"over the server's max_message_bytes; send fewer rows or steps per request"
        )
    states: list[np.ndarray | None] = []
    for spec in m.states:
        s = tensors.get(spec.input)
        if s is not None:
            if sequence:
                raise InvalidArgument(
                    f"input '{spec.input}' is implicit state in a sequence; the server keeps it. Leave it out, "
                    "or send it without a sequence_id for stateless inference"
                )
            _check_dtype(m, spec.input, s)
            expect = [batch, *spec.session_shape]
            if list(s.shape) != expect:
                raise InvalidArgument(
                    f"unexpected shape for input '{spec.input}' for model '{m.name}'. Expected {expect} "
                    f"(batch first, as in '{m.input.name}', then the state's own dims), got {list(s.shape)}"
                )
            if not np.isfinite(s).all():
                raise InvalidArgument(f"input '{spec.input}' contains NaN or Inf; state must be finite")
        states.append(s)
    return x, states


def _check_dtype(m: Manifest, name: str, a: np.ndarray) -> None:
    want = tensor_datatype(m, name)
    got = datatype_of(a.dtype)
    if got != want:
        raise InvalidArgument(f"inference input '{name}' data-type is '{got}', but model '{m.name}' expects '{want}'")


def output_names(model: LoadedModel, requested: list[str], *, sequence: bool) -> list[str]:
    """Outputs to return: those requested by name, else all (stateless) or just ``y`` (sequence)."""
    m = model.manifest
    known = (m.output.name, *(s.output for s in m.states))
    for name in requested:
        if name not in known:
            raise InvalidArgument(
                f"unexpected inference output '{name}' for model '{model.name}'; outputs are {', '.join(known)}"
            )
    if requested:
        return list(dict.fromkeys(requested))
    return [m.output.name] if sequence else list(known)


def answer_bytes(m: Manifest, rows: int, steps: int) -> int:
    """An upper bound of a request's answer: y ``[rows, steps, *out]`` as float32 and every state."""
    out = m.output_elements or max(1, math.prod(d or 1 for d in m.output.frame))
    return rows * (4 * steps * out + m.state_bytes)
