"""The state layout of a user's own PyTorch module, for :func:`cellserve.model.export.export_module`.

A module's ``forward(x, *states)`` does not say what shape its states are. Its recurrent layer says what
they may be (an ``nn.LSTM`` keeps h and c ``[L, B, H]``; a wrapper may stack them ``[2, L, B, H]`` or keep
them batch first ``[B, L, H]``; an ``nn.GRU`` keeps one), so :func:`infer_layout` lists the layouts that fit
the number of state inputs and keeps the first one forward accepts and returns unchanged in shape. The user
passes ``states=`` (and ``layers=``/``hidden=``) where that cannot be told.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Shape = tuple[int | str, ...]  # "B" at the batch axis
RECURRENT = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_KINDS = ", ".join(f"nn.{t.__name__}" for t in RECURRENT)


class LayoutError(ValueError):
    """The module's state layout cannot be told or does not run; the message says what to pass."""


@dataclass(frozen=True)
class Layout:
    """State shapes (with "B") and graph names: x, the state inputs, y, the next states."""

    states: tuple[Shape, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    how: str  # "given", "layers/hidden", or the recurrent module it came from


def state_count(module: nn.Module) -> int | None:
    """How many state inputs ``forward(x, *states)`` takes; None when it takes ``*args``."""
    params = list(inspect.signature(module.forward).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len([p for p in params if p.default is p.empty and p.kind in positional]) - 1  # all but x


def names(count: int, recurrent: nn.Module | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Graph names: h0/c0 -> hn/cn for an LSTM's two states, h0 -> hn for one GRU/RNN state, else state*."""
    if count == 2:
        return ("h0", "c0"), ("hn", "cn")
    if count == 1:
        rnn = isinstance(recurrent, nn.GRU | nn.RNN | nn.GRUCell | nn.RNNCell)
        return (("h0",), ("hn",)) if rnn else (("state",), ("next_state",))
    return tuple(f"state{i}" for i in range(count)), tuple(f"next_state{i}" for i in range(count))


def candidates(recurrent: nn.Module, count: int) -> list[tuple[Shape, ...]]:
    """Layouts of ``count`` states that ``recurrent`` makes plausible, the most common first."""
    if isinstance(recurrent, nn.LSTM | nn.GRU | nn.RNN):
        if recurrent.bidirectional:
            raise LayoutError(
                f"its nn.{type(recurrent).__name__} is bidirectional: its backward direction needs the whole "
                "sequence, so its state cannot be carried from one chunk to the next; serve a unidirectional one"
            )
        if getattr(recurrent, "proj_size", 0):
            raise LayoutError(
                f"its nn.LSTM has proj_size={recurrent.proj_size}: h is [L, B, {recurrent.proj_size}] and c "
                f"[L, B, {recurrent.hidden_size}]; pass states=[(L, 'B', {recurrent.proj_size}), (L, 'B', "
                f"{recurrent.hidden_size})]"
            )
        n, h = int(recurrent.num_layers), int(recurrent.hidden_size)
        lstm = isinstance(recurrent, nn.LSTM)
        if count == 2 and lstm:
            return [((n, "B", h),) * 2, (("B", n, h),) * 2]
        if count == 1 and lstm:
            return [((2, n, "B", h),), (("B", 2, n, h),), ((2, "B", n, h),), ((n, 2, "B", h),)]
        if count == 1:
            return [((n, "B", h),), (("B", n, h),)]
    else:
        h = int(recurrent.hidden_size)
        lstm = isinstance(recurrent, nn.LSTMCell)
        if count == 2 and lstm:
            return [(("B", h),) * 2, ((1, "B", h),) * 2]
        if count == 1 and lstm:
            return [((2, "B", h),), (("B", 2, h),)]
        if count == 1:
            return [(("B", h),), ((1, "B", h),)]
    raise LayoutError(
        f"forward takes {count} state inputs and its nn.{type(recurrent).__name__} keeps "
        f"{2 if 'LSTM' in type(recurrent).__name__ else 1}; pass states=[shape, ...], one shape per state input "
        "with 'B' at the batch axis"
    )


def show(shape: Shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def concrete(shape: Shape, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == "B" else int(d) for d in shape)


def try_layout(module: nn.Module, x: torch.Tensor, layout: Sequence[Shape]) -> str | None:
    """None when forward takes states of ``layout`` and returns (y, *next states) of the same shapes; else why not."""
    batch = x.shape[0]
    states = [torch.zeros(concrete(s, batch)) for s in layout]
    try:
        with torch.no_grad():
            out = module(x, *states)
    except Exception as e:  # whatever the user's forward raises
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__
    if (
        not isinstance(out, tuple | list)
        or len(out) != 1 + len(layout)
        or not all(isinstance(t, torch.Tensor) for t in out)
    ):
        got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, tuple | list) else "")
        return f"returned {got}"
    for s, t in zip(states, out[1:], strict=True):
        if tuple(t.shape) != tuple(s.shape):
            return f"returned a next state of shape {list(t.shape)} for a state of shape {list(s.shape)}"
    return None


def recurrent_of(module: nn.Module) -> nn.Module | None:
    found = [m for m in module.modules() if isinstance(m, RECURRENT)]
    return found[0] if len(found) == 1 else None


def infer_layout(module: nn.Module, x: torch.Tensor, label: str, *, states: Sequence[Shape] | None,
                 layers: int | None, hidden: int | None) -> Layout:  # fmt: skip
    """The module's states: ``states`` as given, else ``[layers, B, hidden]``, else from its recurrent layer."""
    count = state_count(module)
    recurrent = recurrent_of(module)
    if states is not None:
        shapes = tuple(tuple(s) for s in states)
        for s in shapes:
            if list(s).count("B") != 1:
                raise LayoutError(f"states= shape {list(s)} needs exactly one 'B' at its batch axis")
        found, how = [shapes], "given"
    elif count is None:
        raise LayoutError(f"{label}.forward takes *args, so the number of states is not known; pass states=[...]")
    elif count == 0:
        raise LayoutError(
            f"{label}.forward takes only x; cellserve carries the state between steps: write forward(x, *states) "
            "-> (y, *next_states)"
        )
    elif layers is not None and hidden is not None:
        found, how = [((layers, "B", hidden),) * count], "layers/hidden"
    elif recurrent is None:
        n = len([m for m in module.modules() if isinstance(m, RECURRENT)])
        raise LayoutError(
            f"{label} holds {n} recurrent modules ({_KINDS}), so its state shapes are not known; pass "
            "states=[shape, ...], one per state input of forward with 'B' at the batch axis (e.g. states=[(2, 'B', "
            "64)]), or layers= and hidden= for [layers, B, hidden] states"
        )
    else:
        found, how = candidates(recurrent, count), f"nn.{type(recurrent).__name__}"
    errors = []
    for layout in found:
        why = try_layout(module, x, layout)
        if why is None:
            ins, outs = names(len(layout), recurrent)
            return Layout(layout, ins, outs, how)
        errors.append(f"states {' '.join(show(s) for s in layout)}: {why}")
    ins, outs = names(len(found[0]), recurrent)
    raise LayoutError(
        f"{label}.forward(x, {', '.join(ins)}) failed on example inputs x {list(x.shape)} with every state layout "
        f"tried ({'; '.join(errors)}); it must return a tuple (y, {', '.join(outs)}) of tensors, each next state "
        "shaped like its state — pass states=[...] if the layout is another"
    )
