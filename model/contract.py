"""The stateful-model contract cellserve serves, and which graph tensor plays which role in it.

Contract (manifest format 2): one per-step input ``x`` (int64, float32 or float16; ``[B, T, *frame]`` with a
time axis or ``[B, *frame]`` for a per-frame model), one or more state pairs ``in -> out`` (float32 or
float16, any fixed shape with one batch axis anywhere, zeros to start), constant inputs fixed at import, and
one output ``y`` (``[B, T, *out]`` or ``[B, *out]``); other graph outputs are not returned.

This module is the static half: the graph's signature as onnxruntime reports it (:class:`GraphTensor`, no
``onnx`` package, no torch), the user's flags (:class:`RoleHints`), and :func:`resolve_roles`, which picks x,
the state pairs (flags, then common naming — ``h0→hn``, ``state→stateN``, ``cache→new_cache``,
``past_*→present_*`` … — then a unique matching shape), the constants and y. What needs a run of the graph
(undeclared dims, the time axis, the checks) is :mod:`cellserve.model.graph_probe` and
:mod:`cellserve.model.conformance`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellserve.model.manifest import TensorNames

Dim = int | str | None  # a fixed size, a named dynamic axis, or an undeclared one
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(bool)": "bool", "tensor(double)": "float64",
}  # fmt: skip


class ContractError(ValueError):
    """The graph breaks the contract. ``str(e)`` is one line: the problem, then what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = one_line(problem), one_line(fix)
        super().__init__(f"{self.problem}; {self.fix}")


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output as onnxruntime reports it."""

    name: str
    ort_type: str  # "tensor(float)", "tensor(int64)", ...
    shape: tuple[Dim, ...]

    @property
    def dtype(self) -> str | None:
        """numpy dtype name (float32, float16, int64, ...), None for types cellserve never feeds."""
        return _ORT_TYPES.get(self.ort_type)

    def show(self) -> str:
        return f"'{self.name}' {self.dtype or self.ort_type} {show_shape(self.shape)}"


def show_shape(shape: tuple[Any, ...] | list[Any]) -> str:
    """``[2, batch, ?]``: undeclared dims as ``?``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def signature(session: Any) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """Inputs and outputs of an ``onnxruntime.InferenceSession``, in graph order."""

    def tensors(args: list[Any]) -> list[GraphTensor]:
        return [GraphTensor(a.name, a.type, tuple(a.shape or ())) for a in args]

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def dynamic(d: Dim) -> bool:
    return not isinstance(d, int)


DEFAULT_ROLES = TensorNames("x", "h0", "c0", "y", "hn", "cn")  # the names cellserve's own LSTM exports use


@dataclass(frozen=True)
class RoleHints:
    """What the user said (``--input``, ``--state IN:OUT[:AXIS]`` any number of times, ``--output``,
    ``--const NAME=VALUE``, ``--batch-axis``, ``--per-frame``); everything not given is detected.

    ``states`` holds the raw ``IN:OUT[:AXIS]`` strings: they are split against the graph's names, since ONNX
    names may themselves contain ``:``. ``consts`` maps a graph input to its value as text (``"16000"``,
    ``"1,2,3"``), typed later by the input's dtype.
    """

    input: str | None = None
    states: tuple[str, ...] = ()
    output: str | None = None
    consts: tuple[tuple[str, str], ...] = ()
    batch_axis: int | None = None  # the batch axis of every state whose batch axis cannot be told
    per_frame: bool | None = None  # True: x has no time axis; False: x's axis 1 is time; None: detect

    def with_consts(self, consts: Mapping[str, object] | None) -> RoleHints:
        """These hints plus constants given as values (``{"sr": 16000}``, ``{"w": [1, 2]}``) or text."""
        if not consts:
            return self
        text = tuple((k, ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)) for k, v in consts.items())
        return RoleHints(self.input, self.states, self.output, (*self.consts, *text), self.batch_axis, self.per_frame)

    @staticmethod
    def parse_const(raw: str) -> tuple[str, str]:
        """``NAME=VALUE`` (split at the last ``=``, so names may hold one) → (NAME, VALUE)."""
        name, sep, value = raw.rpartition("=")
        if not sep or not name or not value.strip():
            raise ContractError(f"--const {raw!r} is not NAME=VALUE", "e.g. --const sr=16000 or --const w=0.5,1.5")
        return name, value.strip()


@dataclass(frozen=True)
class Roles:
    """Graph tensor names by role, and how each was chosen (flag, name, shape, dtype, order, rest)."""

    input: str
    output: str
    states: tuple[tuple[str, str], ...]  # (in, out) pairs
    consts: tuple[str, ...]
    how: Mapping[str, str]  # "input", "output", each state input's name, each const -> how it was chosen
    state_axes: Mapping[str, int | None]  # state input -> batch axis given by a flag (None: detect)
    ignored: tuple[str, ...] = ()  # graph outputs that are neither y nor a next state: not returned

    def describe(self) -> str:
        pairs = ", ".join(f"state {i} -> {o}" for i, o in self.states)
        consts = "".join(f", const {c}" for c in self.consts)
        return f"input {self.input}, {pairs}{consts}, output {self.output}"


# -- naming: which output is a state input's next value ----------------------------------------------------

# Affixes a state input's name carries (h0, state_in, past_key, prev_h) and its next value's (hn, stateN,
# state_out, present_key, new_cache, h_n). A name minus one affix is its stem; a pair shares a stem.
_IN_PREFIXES = (
    "past_key_values.",
    "past_",
    "prev_",
    "previous_",
    "in_",
    "input_",
    "old_",
    "init_",
    "initial_",
    "last_",
)
_IN_SUFFIXES = ("_in", "_input", "_prev", "_past", "_old", "_init", "_0", "0", "in", "_i", "x")
_OUT_PREFIXES = ("present.", "present_", "next_", "new_", "out_", "output_", "updated_", "upd_")
_OUT_SUFFIXES = ("_out", "_output", "_next", "_new", "_updated", "_n", "n", "_1", "1", "out", "_o", "y")
_X_WORDS = {"x", "inp", "input", "inputs", "tokens", "token", "ids", "features", "feature", "feats", "src", "obs",
            "audio", "samples", "sample", "frame", "frames", "wav", "signal", "data", "chunk", "speech"}  # fmt: skip
_Y_WORDS = {"y", "out", "output", "outputs", "logits", "logit", "probs", "prob", "scores", "score", "pred",
            "preds", "prediction", "predictions", "speech_prob"}  # fmt: skip


def _stems(name: str, prefixes: tuple[str, ...], suffixes: tuple[str, ...]) -> set[str]:
    low = name.lower()
    out = {low[len(p) :] for p in prefixes if low.startswith(p)}
    out |= {low[: -len(s)] for s in suffixes if low.endswith(s)}
    return {s.strip("_.:/") for s in out} - {""}


def name_pairs(state_in: str, outputs: list[str]) -> list[str]:
    """Outputs whose name says it is ``state_in``'s next value (a shared stem, at least one affix dropped)."""
    ins = _stems(state_in, _IN_PREFIXES, _IN_SUFFIXES)
    mine = state_in.lower()
    found = []
    for out in outputs:
        outs = _stems(out, _OUT_PREFIXES, _OUT_SUFFIXES)
        if (ins | {mine}) & outs or ins & {out.lower()}:
            found.append(out)
    return found


def _words(name: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
    return {*re.findall(r"[a-z]+|[0-9]+", spaced), spaced}


def compatible(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    """Declared shapes that may be equal: same rank, fixed sizes equal where both are fixed."""
    return len(a) == len(b) and all(dynamic(x) or dynamic(y) or x == y for x, y in zip(a, b, strict=True))


# -- resolving the roles -------------------------------------------------------------------------------------


def _split_pair(raw: str, inputs: list[str], outputs: list[str]) -> tuple[str, str, int | None]:
    """``IN:OUT[:AXIS]`` → (IN, OUT, AXIS), trying every ``:`` so that names containing one still work."""
    body, axis = raw, None
    head, sep, tail = raw.rpartition(":")
    if sep and re.fullmatch(r"-?\d+", tail) and tail not in outputs:
        body, axis = head, int(tail)
    for i, ch in enumerate(body):
        if ch == ":" and body[:i] in inputs and body[i + 1 :] in outputs:
            return body[:i], body[i + 1 :], axis
    raise ContractError(
        f"--state {raw!r} does not name a graph input and a graph output as IN:OUT[:BATCH_AXIS]",
        f"the graph's inputs are {', '.join(inputs)}; its outputs are {', '.join(outputs)}",
    )


def _need(name: str, names: list[str], what: str, flag: str) -> str:
    if name not in names:
        raise ContractError(
            f"{flag} {name!r} is not an {what} of the graph", f"the graph's {what}s are: {', '.join(names)}"
        )
    return name


def resolve_roles(inputs: list[GraphTensor], outputs: list[GraphTensor], hints: RoleHints) -> Roles:
    """x, the state pairs, the constants and y: flags first, then names, then shapes; refuses what stays open."""
    in_names, out_names = [t.name for t in inputs], [t.name for t in outputs]
    ins, outs = {t.name: t for t in inputs}, {t.name: t for t in outputs}
    how: dict[str, str] = {}
    pairs: dict[str, str] = {}
    axes: dict[str, int | None] = {}
    for raw in hints.states:
        i, o, axis = _split_pair(raw, in_names, out_names)
        if i in pairs or o in pairs.values():
            raise ContractError(f"--state {raw!r} names a tensor another --state names", "give each pair once")
        pairs[i], axes[i], how[i] = o, axis, "flag"
    consts = [_need(n, in_names, "input", "--const") for n, _ in hints.consts]
    how.update(dict.fromkeys(consts, "flag"))
    x = _need(hints.input, in_names, "input", "--input") if hints.input else None
    y = _need(hints.output, out_names, "output", "--output") if hints.output else None
    taken = {*pairs, *consts, x}
    if len(taken - {None}) < len(pairs) + len(consts) + (x is not None):
        raise ContractError("--input, --state and --const name the same graph input", "give each input one role")
    if y is not None and y in pairs.values():
        raise ContractError(f"--output {y!r} is also named as a next state by --state", "give each output one role")
    if len(inputs) < 2:
        raise ContractError(
            f"the graph takes one input ({inputs[0].show() if inputs else 'none'}) and no state",
            "cellserve carries the state between steps: export forward(x, state...) -> (y, next_state...) with each "
            "state as a graph input and its next value as a graph output",
        )

    # Names: a state input pairs with the one free output its name says is its next value.
    free_out = [n for n in out_names if n not in pairs.values() and n != y]
    for name in in_names:
        if name in taken:
            continue
        found = [o for o in name_pairs(name, free_out) if o not in pairs.values()]
        if len(found) > 1:
            found = [
                o
                for o in found
                if outs[o].ort_type == ins[name].ort_type and compatible(outs[o].shape, ins[name].shape)
            ]
        if len(found) > 1:
            raise ContractError(
                f"state input '{name}' pairs by name with {', '.join(found)}: which is its next value is ambiguous",
                f"name the pair with --state {name}:OUT",
            )
        if found:
            pairs[name], axes[name], how[name] = found[0], None, "name"
    free_out = [n for n in out_names if n not in pairs.values() and n != y]

    # x: the flag, else the one input left, else by name, else the one no output is shaped like, else the first.
    rest = [t for t in inputs if t.name not in pairs and t.name not in consts]
    if x is None:
        if not rest:
            raise ContractError(
                f"every graph input ({', '.join(in_names)}) is a state or a constant; none is left for x",
                "name x with --input NAME",
            )
        x, how["input"] = _guess_x(rest, [outs[n] for n in free_out])
    else:
        how["input"] = "flag"

    # Shapes: each input left pairs with the one free output of its dtype and declared shape.
    for t in rest:
        if t.name == x:
            continue
        found = [o for o in free_out if outs[o].ort_type == t.ort_type and compatible(outs[o].shape, t.shape)
                 and o not in pairs.values()]  # fmt: skip
        if len(found) > 1:
            others = [r.name for r in rest if r.name != x and r.name != t.name]
            raise ContractError(
                f"state input {t.show()} could pair with outputs {', '.join(found)} (same dtype and shape), and no "
                f"name says which is its next value{' (nor for ' + ', '.join(others) + ')' if others else ''}",
                f"name every pair: --state {t.name}:OUT (once per state, e.g. --state h0:hn --state c0:cn)",
            )
        if found and y is None and len(free_out) == 1:
            found = []  # the only free output is y, not a next state
        if found:
            pairs[t.name], axes[t.name], how[t.name] = found[0], None, "shape"
    unpaired = [ins[n] for n in in_names if n not in pairs and n not in consts and n != x]
    if unpaired:
        _refuse_unpaired(unpaired)

    # y: the flag, else the one output left, else by name, else the first left.
    left = [n for n in out_names if n not in pairs.values()]
    if y is None:
        if not left:
            raise ContractError(
                f"every graph output ({', '.join(out_names)}) is a next state; none is left for y",
                "export forward to return y as well, or name it with --output NAME",
            )
        y, how["output"] = _guess_y(left)
    else:
        how["output"] = "flag"
    states = tuple((i, pairs[i]) for i in in_names if i in pairs)
    ignored = tuple(n for n in left if n != y)
    return Roles(x, y, states, tuple(consts), how, axes, ignored)


def _refuse_unpaired(unpaired: list[GraphTensor]) -> None:
    names = ", ".join(t.show() for t in unpaired)
    if any(any(dynamic(d) for d in t.shape) for t in unpaired):  # shaped by the batch: a state without a next value
        raise ContractError(
            f"the graph returns no next state for {' and '.join(t.name for t in unpaired)}: no graph output pairs "
            f"with {names} by name or by shape",
            "export forward to return each state's next value as a graph output (e.g. h0 -> hn), name pairs with "
            "--state IN:OUT, or give a constant input its value with --const NAME=VALUE",
        )
    flags = " ".join(f"--const {t.name}=VALUE" for t in unpaired)
    raise ContractError(
        f"graph input{'s' if len(unpaired) > 1 else ''} {names} {'are' if len(unpaired) > 1 else 'is'} neither x "
        "nor a state, and cellserve feeds a constant input only the value given at import",
        f"give {'their values' if len(unpaired) > 1 else 'its value'}: {flags} (a scalar or a short list, e.g. "
        "--const sr=16000), or name a state pair with --state IN:OUT",
    )


def _guess_x(candidates: list[GraphTensor], free_out: list[GraphTensor]) -> tuple[str, str]:
    """The input that is x: the one left, then by name, then the one no output is shaped like, then the first."""
    if len(candidates) == 1:
        return candidates[0].name, "rest"
    named = [t for t in candidates if _words(t.name) & _X_WORDS]
    if len(named) == 1:
        return named[0].name, "name"
    unlike = [t for t in candidates if not any(o.ort_type == t.ort_type and compatible(o.shape, t.shape)
                                               for o in free_out)]  # fmt: skip
    if len(unlike) == 1:
        return unlike[0].name, "shape"
    return candidates[0].name, "order"


def _guess_y(left: list[str]) -> tuple[str, str]:
    if len(left) == 1:
        return left[0], "rest"
    named = [n for n in left if _words(n) & _Y_WORDS]
    if len(named) == 1:
        return named[0], "name"
    return left[0], "order"
