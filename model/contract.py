"""The LSTM graph contract cellserve serves, and which graph tensor plays which role in it.

Contract: ``(x, h0, c0) -> (y, hn, cn)``, with

- ``x``: int64 token ids ``[B, T]`` or float32 features ``[B, T, I]`` (batch first, then time);
- ``h0``, ``c0`` and ``hn``, ``cn``: float32 ``[L, B, H]`` (layers first, as ``torch.nn.LSTM``'s state),
  one h/c pair of the same shape, ``hn``/``cn`` the state after the last step of ``x``;
- ``y``: float32 ``[B, T, O]``;
- ``B`` and ``T`` dynamic; ``L``, ``H``, ``I``, ``O`` fixed.

Tensor names are free: :class:`Roles` maps each role to the graph's name, from the user's flags
(:class:`RoleHints`) or detected from conventional names and shapes. Graph signatures come from
onnxruntime's session metadata (:class:`GraphTensor`), so nothing here needs the ``onnx`` package or torch.
The checks themselves are :func:`cellserve.model.conformance.check_graph`.
"""

from __future__ import annotations

import re
from dataclasses import astuple, dataclass
from typing import Any

from cellserve.model.manifest import InputKind, TensorInfo

Dim = int | str | None  # a fixed size, a named dynamic axis, or an unnamed one
_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}


class ContractError(ValueError):
    """The graph breaks the contract. ``str(e)`` is one line: the problem, then how to re-export."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = one_line(problem), one_line(fix)
        super().__init__(f"{self.problem}; {self.fix}")


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Roles:
    """Graph tensor names by role."""

    input: str
    state_h: str
    state_c: str
    output: str
    next_state_h: str
    next_state_c: str

    def describe(self) -> str:
        return (
            f"input {self.input}, state h {self.state_h} -> {self.next_state_h}, "
            f"state c {self.state_c} -> {self.next_state_c}, output {self.output}"
        )


@dataclass(frozen=True)
class RoleHints:
    """Roles the user gave (``--input``, ``--state IN:OUT`` up to twice, h first, ``--output``).

    ``states`` holds the raw ``IN:OUT`` strings: they are split against the graph's names, since ONNX
    names may themselves contain ``:``. Roles not given are detected.
    """

    input: str | None = None
    states: tuple[str, ...] = ()
    output: str | None = None

    @staticmethod
    def of(roles: Roles) -> RoleHints:
        """Every role given, as the flags would give it."""
        pairs = (f"{roles.state_h}:{roles.next_state_h}", f"{roles.state_c}:{roles.next_state_c}")
        return RoleHints(roles.input, pairs, roles.output)


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output as onnxruntime reports it."""

    name: str
    ort_type: str  # "tensor(float)", "tensor(int64)", ...
    shape: tuple[Dim, ...]

    @property
    def dtype(self) -> str | None:
        """numpy dtype name for the types the contract allows (float32, int64), else None."""
        return _ORT_TYPES.get(self.ort_type)

    def show(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"'{self.name}' {self.dtype or self.ort_type} [{dims}]"


def signature(session: Any) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """Inputs and outputs of an ``onnxruntime.InferenceSession``, in graph order."""

    def tensors(args: list[Any]) -> list[GraphTensor]:
        return [GraphTensor(a.name, a.type, tuple(a.shape or ())) for a in args]

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def dynamic(d: Dim) -> bool:
    return not isinstance(d, int)


DEFAULT_ROLES = Roles("x", "h0", "c0", "y", "hn", "cn")  # the names cellserve's own exports use


def manifest_tensors(
    roles: Roles, kind: InputKind, input_size: int, output_size: int, layers: int, hidden: int
) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The manifest's inputs and outputs for a graph keeping the contract ("B"/"T" mark the dynamic axes)."""
    r, state = roles, [layers, "B", hidden]
    if kind == "tokens":
        x = TensorInfo(r.input, "input", "int64", ["B", "T"])
    else:
        x = TensorInfo(r.input, "input", "float32", ["B", "T", input_size])
    inputs = [x, TensorInfo(r.state_h, "state_h", "float32", state), TensorInfo(r.state_c, "state_c", "float32", state)]
    outputs = [
        TensorInfo(r.output, "output", "float32", ["B", "T", output_size]),
        TensorInfo(r.next_state_h, "next_state_h", "float32", state),
        TensorInfo(r.next_state_c, "next_state_c", "float32", state),
    ]
    return inputs, outputs


def reexport_hint(names: tuple[str, ...] = astuple(DEFAULT_ROLES)) -> str:
    """The torch.onnx.export ``dynamic_axes`` that give the contract's dynamic axes, with the graph's names."""
    x, h0, c0, y, hn, cn = names
    axes = (
        f"{{'{x}': {{0: 'B', 1: 'T'}}, '{h0}': {{1: 'B'}}, '{c0}': {{1: 'B'}}, "
        f"'{y}': {{0: 'B', 1: 'T'}}, '{hn}': {{1: 'B'}}, '{cn}': {{1: 'B'}}}}"
    )
    return f"re-export with torch.onnx.export(..., dynamic_axes={axes})"


# -- roles ---------------------------------------------------------------------------------------------

_H_WORDS = {"h", "hn", "hx", "hy", "ht", "hidden", "hid"}
_C_WORDS = {"c", "cn", "cx", "cy", "ct", "cell"}
_X_WORDS = {"x", "inp", "input", "inputs", "tokens", "token", "ids", "features", "feature", "feats", "src", "obs"}


def _words(name: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
    return set(re.findall(r"[a-z]+|[0-9]+", spaced))


def state_letter(name: str) -> str | None:
    """Which LSTM state a tensor's name says it is (h0, h_out, hidden → "h"; c_in, cell → "c"), else None."""
    words = _words(name)
    h, c = bool(words & _H_WORDS), bool(words & _C_WORDS)
    return "h" if h and not c else "c" if c and not h else None


def _split_pair(raw: str, inputs: list[str], outputs: list[str]) -> tuple[str, str]:
    """``IN:OUT`` → (IN, OUT), trying every ``:`` so that names containing one still work."""
    for i, ch in enumerate(raw):
        if ch == ":" and raw[:i] in inputs and raw[i + 1 :] in outputs:
            return raw[:i], raw[i + 1 :]
    raise ContractError(
        f"--state {raw!r} does not name a graph input and a graph output as IN:OUT",
        f"the graph's inputs are {', '.join(inputs)}; its outputs are {', '.join(outputs)}",
    )


def _need(name: str, names: list[str], what: str, flag: str) -> str:
    if name not in names:
        raise ContractError(
            f"{flag} {name!r} is not an {what} of the graph", f"the graph's {what}s are: {', '.join(names)}"
        )
    return name


def resolve_input_roles(
    inputs: list[GraphTensor], outputs: list[GraphTensor], hints: RoleHints
) -> tuple[str, str, str, list[tuple[str, str]], dict[str, str]]:
    """Pick x, h0, c0 (and any flagged state pairs); returns (x, h0, c0, flagged pairs, how)."""
    in_names, out_names = [t.name for t in inputs], [t.name for t in outputs]
    if len(hints.states) > 2:
        raise ContractError(
            f"{len(hints.states)} --state pairs given", "an LSTM has two: --state H_IN:H_OUT --state C_IN:C_OUT"
        )
    pairs = [_split_pair(s, in_names, out_names) for s in hints.states]
    how: dict[str, str] = {}
    x = _need(hints.input, in_names, "input", "--input") if hints.input else None
    if x:
        how["input"] = "flag"
    taken = {x, *(p[0] for p in pairs)}
    free = [t for t in inputs if t.name not in taken]
    n_state = len(inputs) - 1
    if len(inputs) == 1:
        raise ContractError(
            f"the graph takes one input ({inputs[0].show()}) and no state inputs",
            "cellserve carries the state between steps: export forward(x, h0, c0) -> (y, hn, cn) with h0 and c0 "
            "as graph inputs and hn, cn as outputs",
        )
    if n_state == 1:
        state = next(t for t in inputs if t.name != (x or _guess_x(inputs)[0]))
        raise ContractError(
            f"the graph has a single state input ({state.show()}), like a GRU; cellserve serves an LSTM's two "
            "states, h and c, of the same shape [L, B, H]",
            "export an LSTM whose forward(x, h0, c0) returns (y, hn, cn)",
        )
    if n_state > 2:
        raise ContractError(
            f"the graph has {len(inputs)} inputs ({', '.join(in_names)}); cellserve feeds exactly three: x, h0, c0",
            "export forward(x, h0, c0) -> (y, hn, cn), or name the roles with --input and --state",
        )
    if x is None:
        x, how["input"] = _guess_x(free)
        free = [t for t in free if t.name != x]
    if len(pairs) == 2:
        h0, c0 = pairs[0][0], pairs[1][0]
        how["state_h"] = how["state_c"] = "flag"
    elif len(pairs) == 1:
        h0, c0 = pairs[0][0], free[0].name
        how["state_h"], how["state_c"] = "flag", "order"
    else:
        a, b = free[0].name, free[1].name
        la, lb = state_letter(a), state_letter(b)
        if {la, lb} == {"h", "c"}:
            h0, c0 = (a, b) if la == "h" else (b, a)
            how["state_h"] = how["state_c"] = "name"
        else:
            h0, c0 = a, b  # graph order, as torch.nn.LSTM's (h0, c0)
            how["state_h"] = how["state_c"] = "order"
    if x in (h0, c0) or h0 == c0:
        raise ContractError("--input and --state name the same tensor", "give each role its own graph input")
    return x, h0, c0, pairs, how


def _guess_x(candidates: list[GraphTensor]) -> tuple[str, str]:
    """The input that is x: the int64 one, then by name, then the one whose shape the other two don't share."""
    if len(candidates) == 1:
        return candidates[0].name, "rest"
    ints = [t for t in candidates if t.dtype == "int64"]
    if len(ints) == 1:
        return ints[0].name, "dtype"
    named = [t for t in candidates if _words(t.name) & _X_WORDS and state_letter(t.name) is None]
    if len(named) == 1:
        return named[0].name, "name"
    lettered = [t for t in candidates if state_letter(t.name) is not None]
    if len(candidates) == 3 and len(lettered) == 2 and {state_letter(t.name) for t in lettered} == {"h", "c"}:
        return next(t.name for t in candidates if t not in lettered), "name"
    for t in candidates:
        others = [o.shape for o in candidates if o is not t]
        if len(others) == 2 and others[0] == others[1] and t.shape != others[0]:
            return t.name, "shape"
    return candidates[0].name, "order"


def resolve_output_roles(
    outputs: list[GraphTensor],
    probe: dict[str, tuple[int, ...]],
    state_shape: tuple[int, int, int],
    h0: str,
    c0: str,
    pairs: list[tuple[str, str]],
    hints: RoleHints,
) -> tuple[str, str, str, dict[str, str]]:
    """Pick y, hn, cn: flags, then outputs shaped like the state (seen in a probe run), paired by name or order."""
    out_names = [t.name for t in outputs]
    how: dict[str, str] = {}
    flagged = dict(pairs)  # input name -> output name
    y = _need(hints.output, out_names, "output", "--output") if hints.output else None
    if y:
        how["output"] = "flag"
    state_like = [n for n in out_names if probe[n] == state_shape and n != y and n not in flagged.values()]
    other = [n for n in out_names if n not in state_like and n != y and n not in flagged.values()]
    hn, cn = flagged.get(h0), flagged.get(c0)
    if hn:
        how["next_state_h"] = "flag"
    if cn:
        how["next_state_c"] = "flag"
    missing = [s for s, n in ((h0, hn), (c0, cn)) if n is None]
    if len(state_like) < len(missing):
        found = f"only {', '.join(state_like)} is" if state_like else "none is"
        shapes = ", ".join(f"{n} {list(probe[n])}" for n in out_names)
        raise ContractError(
            f"the graph returns no next state for {' and '.join(missing)}: of its outputs ({shapes}) {found} "
            f"shaped like the state {list(state_shape)}",
            "export forward(x, h0, c0) to return (y, hn, cn), the state after the last step, as graph outputs",
        )
    if len(missing) == 2:
        a, b = state_like[0], state_like[1]
        la, lb = state_letter(a), state_letter(b)
        by_name = {la, lb} == {"h", "c"}
        hn, cn = (a, b) if not by_name or la == "h" else (b, a)
        how["next_state_h"] = how["next_state_c"] = "name" if by_name else "order"
        state_like = state_like[2:]
    elif len(missing) == 1:
        pick = next((n for n in state_like if state_letter(n) == ("h" if hn is None else "c")), state_like[0])
        if hn is None:
            hn, how["next_state_h"] = pick, "name" if state_letter(pick) == "h" else "order"
        else:
            cn, how["next_state_c"] = pick, "name" if state_letter(pick) == "c" else "order"
        state_like = [n for n in state_like if n != pick]
    rest = other + state_like
    if y is None:
        if not rest:
            raise ContractError(
                f"the graph's outputs ({', '.join(out_names)}) are all state; it returns no y",
                "export forward(x, h0, c0) to return (y, hn, cn)",
            )
        y, how["output"] = rest[0], "shape" if other else "order"
        rest = rest[1:]
    if rest:
        raise ContractError(
            f"the graph has {len(outputs)} outputs ({', '.join(out_names)}); {', '.join(rest)} has no role "
            "and cellserve returns exactly three: y, hn, cn",
            "export forward(x, h0, c0) -> (y, hn, cn) only, or name the roles with --output and --state",
        )
    assert hn is not None and cn is not None
    return y, hn, cn, how
