"""A request's tensors checked against the model: names, datatypes, shapes, and what fits a reply.

Per-row checks (vocabulary, NaN) are the model's own (:meth:`LoadedModel.check_input`); shapes are
described in :mod:`cellserve.server.oip`.
"""

from __future__ import annotations

import numpy as np

from cellserve.model.manifest import Manifest
from cellserve.server.errors import InvalidArgument
from cellserve.server.models import LoadedModel
from cellserve.server.oip.tensors import datatype_of, tensor_datatype


def split_inputs(
    model: LoadedModel, tensors: dict[str, np.ndarray], *, max_batch: int, sequence: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Check a request's inputs against the model; returns (x, h0, c0) with batch first.

    ``x`` is ``[B, T]`` or ``[B, T, I]``; ``h0``/``c0`` are ``[B, L, H]`` float32 or None.
    """
    m = model.manifest
    n = m.names
    for name in tensors:
        if name not in (n.x, n.h0, n.c0):
            raise InvalidArgument(
                f"unexpected inference input '{name}' for model '{m.name}'; inputs are {n.x}, {n.h0}, {n.c0}"
            )
    x = tensors.get(n.x)
    if x is None:
        raise InvalidArgument(f"expected input '{n.x}' for model '{m.name}' is missing")
    _check_dtype(m, n.x, x)
    want = [-1, -1, *m.step_dims]
    batch_ok = 1 <= (x.shape[0] if x.ndim else 0) <= (1 if sequence else max_batch)
    if x.ndim != len(want) or any(w not in (-1, d) for w, d in zip(want, x.shape, strict=True)) or not batch_ok:
        batch = "1 (a sequence request carries one sequence)" if sequence else f"1..{max_batch} (max_batch_size)"
        raise InvalidArgument(
            f"unexpected shape for input '{n.x}' for model '{m.name}'. Expected {want}, got {list(x.shape)}; "
            f"the first dimension is the batch ({batch}), then T steps"
        )
    if not 1 <= x.shape[1] <= model.max_steps:
        raise InvalidArgument(f"input '{n.x}' has T={x.shape[1]} steps; model '{m.name}' takes 1..{model.max_steps}")
    batch, steps = x.shape[:2]
    reply_floats = batch * (steps * m.output_size + (0 if sequence else 2 * m.layers * m.hidden))  # y (+ hn, cn)
    if reply_floats > model.max_output_steps * m.output_size:  # what fits one message (max_message_bytes)
        raise InvalidArgument(
            f"the reply to {batch} row(s) of T={steps} steps would be {4 * reply_floats} bytes of float32 outputs, "
            f"over the server's max_message_bytes; send fewer rows or steps per request"
        )
    states: list[np.ndarray | None] = []
    for name in (n.h0, n.c0):
        s = tensors.get(name)
        if s is not None:
            if sequence:
                raise InvalidArgument(
                    f"input '{name}' is implicit state in a sequence; the server keeps it. Leave it out, "
                    "or send it without a sequence_id for stateless inference"
                )
            _check_dtype(m, name, s)
            expect = [x.shape[0], m.layers, m.hidden]
            if list(s.shape) != expect:
                raise InvalidArgument(
                    f"unexpected shape for input '{name}' for model '{m.name}'. Expected {expect} "
                    f"([batch, layers, hidden], batch as in '{n.x}'), got {list(s.shape)}"
                )
            if not np.isfinite(s).all():
                raise InvalidArgument(f"input '{name}' contains NaN or Inf; state must be finite")
        states.append(s)
    return x, states[0], states[1]


def _check_dtype(m: Manifest, name: str, a: np.ndarray) -> None:
    want = tensor_datatype(m, name)
    got = datatype_of(a.dtype)
    if got != want:
        raise InvalidArgument(f"inference input '{name}' data-type is '{got}', but model '{m.name}' expects '{want}'")


def output_names(model: LoadedModel, requested: list[str], *, sequence: bool) -> list[str]:
    """Outputs to return: those requested by name, else all (stateless) or just ``y`` (sequence)."""
    n = model.manifest.names
    known = (n.y, n.hn, n.cn)
    for name in requested:
        if name not in known:
            raise InvalidArgument(
                f"unexpected inference output '{name}' for model '{model.name}'; outputs are {', '.join(known)}"
            )
    if requested:
        return list(dict.fromkeys(requested))
    return [n.y] if sequence else list(known)
