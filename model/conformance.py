"""Whether an ONNX graph keeps the serving contract (:mod:`cellserve.model.contract`): every check, in order.

:func:`check_graph` resolves the roles (flags, names, shapes), learns what the signature leaves open by
running the graph (:mod:`cellserve.model.graph_probe`), then checks by running it:

- it runs at B ∈ {1, 3} (and T ∈ {1, 2, 7} with a time axis), every next state shaped like its state, all finite;
- every state input is used (y or another next state changes with it);
- batch independence: each row of a B=3 run equals its own B=1 run; for a per-frame model, frames run one
  by one at B=1 equal the same frames interleaved with other sessions' frames at B=3 (rows shuffled per call).
  Skipped for a graph whose batch is fixed at 1 (it is served by batch-1 calls);
- chunked == whole, with a time axis: a sequence run in random chunks, every state carried, equals it run whole.

The first broken rule raises :class:`ContractError`, one line saying what is wrong and what to do. Only
onnxruntime and numpy are needed (no torch, no ``onnx`` package), so ``cellserve import-onnx`` runs in the
serving image.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cellserve.model.contract import ContractError, GraphTensor, RoleHints, Roles, resolve_roles, signature
from cellserve.model.graph_probe import GraphRunner, first_line, learn_contract
from cellserve.model.manifest import ConstSpec, InputKind, InputSpec, OutputSpec, StateSpec
from cellserve.model.tensor_specs import CONST_DTYPES, MAX_CONST_VALUES

PARITY_ATOL = 1e-5  # |a - b| <= 1e-5 · max(1, |b|) elementwise: absolute up to 1, relative above
FP16_ATOL = 1e-2  # float16 anywhere: a state rounded at each chunk's end is ~1e-3 from one kept in float32
RUN_GRID: tuple[tuple[int, int], ...] = tuple((b, t) for b in (1, 3) for t in (1, 2, 7))
CHUNKED_BATCH, CHUNKED_STEPS, CHUNKS = 2, 24, 5  # one sequence per row, cut at 4 random points
INTERLEAVED_SESSIONS, INTERLEAVED_FRAMES = 3, 4


@dataclass(frozen=True)
class CheckedGraph:
    """A graph that keeps the contract: its roles, the manifest's specs, and what the checks saw."""

    roles: Roles
    detected: dict[str, str]  # role or property -> how it was chosen or found (flag, name, shape, probed, ...)
    input: InputSpec
    output: OutputSpec
    states: tuple[StateSpec, ...]
    consts: tuple[ConstSpec, ...]
    fixed_batch: int | None
    report: dict[str, Any] = field(default_factory=dict)  # what the runtime checks ran and the largest differences
    producer: str = ""  # from the file's metadata: the exporter that wrote it, and the graph's name
    graph_name: str = ""

    @property
    def vocab_source(self) -> str:
        return self.detected.get("vocab", "")

    @property
    def lstm(self) -> dict[str, int] | None:
        """``{"layers", "hidden"}`` for the LSTM case: h and c float32 [L, B, H], a time axis, a dynamic batch."""
        s = self.states
        one = len(self.input.frame) <= 1 and None not in self.input.frame and len(self.output.frame) == 1
        plain = self.input.time_axis and self.fixed_batch is None and not self.consts
        if len(s) != 2 or not plain or not one or None in self.output.frame:
            return None
        if s[0].shape != s[1].shape or len(s[0].shape) != 3 or s[0].batch_axis != 1:
            return None
        if any(t.dtype != "float32" for t in s) or self.output.dtype != "float32" or self.input.dtype == "float16":
            return None
        return {"layers": int(s[0].shape[0]), "hidden": int(s[0].shape[2])}

    # Our LSTM's sizes, as the format-1 manifest had them (0 where the graph is not that case).
    @property
    def input_kind(self) -> InputKind:
        return "tokens" if self.input.vocab is not None else "features"

    @property
    def input_size(self) -> int:
        frame = self.input.frame
        return self.input.vocab or (frame[0] or 0 if len(frame) == 1 else 0)

    @property
    def output_size(self) -> int:
        return self.output.frame[0] or 0 if len(self.output.frame) == 1 else 0

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about the checks: how roles were chosen, what ran, the graph's producer."""
        extra = {"vocab": self.vocab_source} if self.vocab_source else {}
        return {"producer": self.producer, "graph_name": self.graph_name, "roles": dict(self.detected), **extra,
                "checks": self.report}  # fmt: skip


def random_feeds(kind: InputKind, input_size: int, layers: int, hidden: int, batch: int, steps: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Random LSTM (x, h0, c0): token ids in [0, input_size) or standard-normal features, and non-zero state."""
    if kind == "tokens":
        x = rng.integers(0, input_size, size=(batch, steps), dtype=np.int64)  # [B, T]
    else:
        x = rng.standard_normal((batch, steps, input_size)).astype(np.float32)  # [B, T, I]
    state = (layers, batch, hidden)  # [L, B, H]
    h0 = (0.5 * rng.standard_normal(state)).astype(np.float32)
    c0 = (0.5 * rng.standard_normal(state)).astype(np.float32)
    return x, h0, c0


def scaled_max(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max(1, |ref|) (0 for empty arrays), computed in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref) / np.maximum(1.0, np.abs(ref)))) if a.size else 0.0


def open_session(path: Path | str) -> ort.InferenceSession:
    """A quiet onnxruntime CPU session for the checks (a failing probe run is a finding, not a log line)."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path} does not exist", "pass the path of an .onnx file")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several types (InvalidGraph, Fail, InvalidProtobuf, ...)
        raise ContractError(
            f"onnxruntime {ort.__version__} cannot load {path.name}: {first_line(e)}",
            "pass an ONNX model that onnxruntime can run (torch.onnx.export with opset >= 14 makes one)",
        ) from None


def check_graph(path: Path | str, hints: RoleHints | None = None, *, vocab: int | None = None,
                seed: int = 0) -> CheckedGraph:  # fmt: skip
    """Check the ONNX file at ``path`` against the contract; :class:`ContractError` at the first broken rule."""
    hints = hints or RoleHints()
    session = open_session(path)
    inputs, outputs = signature(session)
    roles = resolve_roles(inputs, outputs, hints)
    tensors = {t.name: t for t in (*inputs, *outputs)}
    consts = [const_spec(tensors[n], v) for n, v in hints.consts]
    runner = GraphRunner(session, roles, {c.name: a for c, a in consts})
    learned = learn_contract(runner, tensors, hints, vocab)
    tol = FP16_ATOL if "float16" in {learned.input.dtype, learned.output.dtype, *(s.dtype for s in runner.states)} \
        else PARITY_ATOL  # fmt: skip
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {"runs": _check_runs(runner, rng, learned.output)}
    _check_state_used(runner, rng)
    if learned.fixed_batch == 1:
        report["batch"] = "skipped: the graph's batch is fixed at 1, so it is served by batch-1 calls"
    elif learned.input.time_axis:
        report["batch_rows_max_scaled_diff"] = _check_batch_rows(runner, rng, tol)
    else:
        report["interleaved_max_scaled_diff"] = _check_interleaved(runner, rng, tol)
    if learned.input.time_axis:
        report["chunks"], report["chunked_max_scaled_diff"] = _check_chunked(
            runner, rng, tol, learned.fixed_batch or CHUNKED_BATCH
        )
    report["tolerance"] = tol
    meta = session.get_modelmeta()
    detected = {**roles.how, **learned.how}
    return CheckedGraph(roles, detected, learned.input, learned.output, learned.states, tuple(c for c, _ in consts),
                        learned.fixed_batch, report, meta.producer_name, meta.graph_name)  # fmt: skip


# -- runtime checks ----------------------------------------------------------------------------------------


def _take(a: np.ndarray, rows: Any, axis: int) -> np.ndarray:
    return np.take(a, rows, axis=axis)


def _check_runs(runner: GraphRunner, rng: np.random.Generator, out: OutputSpec) -> list[list[int]]:
    assert runner.input is not None
    time = runner.input.time_axis
    batches = (1,) if runner.fixed_batch == 1 else (1, 3)
    grid = [(b, t) for b in batches for t in ((1, 2, 7) if time else (None,))]
    for batch, steps in grid:
        y, nexts = runner.run(runner.x(rng, batch, steps), runner.random_states(rng, batch))
        at = f"at B={batch}" + (f", T={steps}" if steps else "")
        lead = (batch, steps) if steps else (batch,)
        want = [*lead, *out.frame]
        if y.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, y.shape, strict=True)):
            raise ContractError(
                f"{at} output '{out.name}' has shape {list(y.shape)}, not {['?' if w is None else w for w in want]}",
                "batch and time must stay dynamic all the way through the graph (no Reshape to a fixed size)",
            )
        for spec, a in zip(runner.states, nexts, strict=True):
            if a.shape != spec.graph_shape(batch):
                raise ContractError(
                    f"{at} next state '{spec.output}' has shape {list(a.shape)}; it must have the state's shape "
                    f"{list(spec.graph_shape(batch))}",
                    "return the next state exactly as the state came in (same layout)",
                )
        for name, a in ((out.name, y), *((s.output, n) for s, n in zip(runner.states, nexts, strict=True))):
            if not np.isfinite(a.astype(np.float64)).all():
                raise ContractError(f"{at} output '{name}' holds NaN or Inf for finite inputs", "check the exported "
                                    "weights (and, for float16, that values stay in its range)")  # fmt: skip
    return [[b, t] if t else [b] for b, t in grid]


def _check_state_used(runner: GraphRunner, rng: np.random.Generator) -> None:
    """Each state input changes y or another next state: a graph that ignores one would serve fresh state."""
    assert runner.input is not None
    x = runner.x(rng, 1, 3 if runner.input.time_axis else None)
    states = runner.random_states(rng, 1)
    y, nexts = runner.run(x, states)
    for k, spec in enumerate(runner.states):
        other = [*states[:k], np.zeros_like(states[k]), *states[k + 1 :]]
        y2, nexts2 = runner.run(x, other)
        moved = not np.array_equal(y, y2) or any(
            not np.array_equal(a, b) for j, (a, b) in enumerate(zip(nexts, nexts2, strict=True)) if j != k
        )
        if not moved:
            raise ContractError(
                f"the graph ignores its state input '{spec.input}': y is the same whatever it holds",
                "pass the state on to the recurrent layer in forward (self.lstm(x, (h0, c0))) and re-export, so "
                "that a step continues the session's state",
            )


_MIXED = (
    "nothing in forward may be computed across the batch axis: a state used with the wrong batch axis, a batch "
    "statistic, or onnxruntime's dynamic quantization (its activation scale spans the whole batch; quantize "
    "weights only, or export the float model); if the graph was exported for batch 1, export x with batch 1"
)


def _check_batch_rows(runner: GraphRunner, rng: np.random.Generator, tol: float) -> float:
    """Each row of a B=3 run equals that row run alone: sessions batched together never mix."""
    x, states = runner.x(rng, 3, 7), runner.random_states(rng, 3)
    y, nexts = runner.run(x, states)
    worst = 0.0
    for r in range(3):
        specs = runner.states
        alone_y, alone_n = runner.run(
            x[r : r + 1], [_take(s, [r], p.batch_axis) for s, p in zip(states, specs, strict=True)]
        )
        diff = max(
            scaled_max(alone_y, y[r : r + 1]),
            *(scaled_max(a, _take(n, [r], p.batch_axis)) for a, n, p in zip(alone_n, nexts, specs, strict=True)),
        )
        worst = max(worst, diff)
        if diff > tol:
            raise ContractError(
                f"rows of a batch are not independent: row {r} of a B=3 run differs by {diff:.3g} from the same row "
                "run alone, and cellserve batches many sessions into one run", _MIXED,
            )  # fmt: skip
    return worst


def _check_interleaved(runner: GraphRunner, rng: np.random.Generator, tol: float) -> float:
    """Per-frame: each session's frames one by one at B=1 equal them interleaved with others' at B=3."""
    n, k = INTERLEAVED_SESSIONS, INTERLEAVED_FRAMES
    frames = [[runner.x(rng, 1, None) for _ in range(k)] for _ in range(n)]
    start = [runner.random_states(rng, 1) for _ in range(n)]
    alone: list[list[np.ndarray]] = []
    for s in range(n):
        states, ys = start[s], []
        for f in frames[s]:
            y, states = runner.run(f, states)
            ys.append(y)
        alone.append([*ys, *states])
    held, got = [list(st) for st in start], [[] for _ in range(n)]  # type: ignore[var-annotated]
    for t in range(k):
        order = [(s + t) % n for s in range(n)]  # each call puts the sessions in other rows
        x = np.concatenate([frames[s][t] for s in order])
        states = [np.concatenate([held[s][j] for s in order], axis=p.batch_axis) for j, p in enumerate(runner.states)]
        y, nexts = runner.run(x, states)
        for row, s in enumerate(order):
            got[s].append(y[row : row + 1])
            held[s] = [_take(a, [row], p.batch_axis) for a, p in zip(nexts, runner.states, strict=True)]
    worst = 0.0
    for s in range(n):
        diff = max(scaled_max(a, b) for a, b in zip([*got[s], *held[s]], alone[s], strict=True))
        worst = max(worst, diff)
        if diff > tol:
            raise ContractError(
                f"rows of a batch are not independent: session {s}'s {k} frames run at B=1 differ by {diff:.3g} from "
                "the same frames interleaved with other sessions' at B=3, and cellserve batches many sessions into "
                "one run", _MIXED,
            )  # fmt: skip
    return worst


def _check_chunked(runner: GraphRunner, rng: np.random.Generator, tol: float, batch: int) -> tuple[list[int], float]:
    """One sequence run in random chunks, every state carried, equals the same sequence run whole."""
    x, start = runner.x(rng, batch, CHUNKED_STEPS), runner.random_states(rng, batch)
    whole_y, whole_n = runner.run(x, start)
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, CHUNKED_STEPS), size=CHUNKS - 1, replace=False))
    bounds = [0, *cuts, CHUNKED_STEPS]
    ys, states = [], start
    for a, b in itertools.pairwise(bounds):
        y, states = runner.run(x[:, a:b], states)
        ys.append(y)
    chunks = [b - a for a, b in itertools.pairwise(bounds)]
    diffs = {runner.roles.output: scaled_max(np.concatenate(ys, axis=1), whole_y)}
    diffs.update({p.output: scaled_max(a, b) for p, a, b in zip(runner.states, states, whole_n, strict=True)})
    name, diff = max(diffs.items(), key=lambda kv: kv[1])
    if diff > tol:
        pairs = ", ".join(f"{i} -> {o}" for i, o in runner.roles.states)
        raise ContractError(
            f"chunked != whole: one sequence run in chunks {chunks} with the state carried ({pairs}) differs from "
            f"the same sequence run whole by {diff:.3g} in '{name}' (tolerance {tol})",
            "re-export so that each next state is the whole state after the last step of x (every recurrent part of "
            "forward takes its state from an input and returns it; a bidirectional LSTM's cannot be carried); if "
            "the graph pairs its state otherwise, name the pairs: import-onnx --state IN:OUT (once per pair, e.g. "
            "--state h0:hn --state c0:cn), or pass --per-frame if x has no time axis",
        )
    return chunks, max(diffs.values())


# -- constants ----------------------------------------------------------------------------------------------


def const_spec(t: GraphTensor, text: str) -> tuple[ConstSpec, np.ndarray]:
    """A constant input's value from ``--const NAME=VALUE`` text, typed by the graph input's dtype and shape."""
    dtype = t.dtype
    if dtype not in CONST_DTYPES:
        raise ContractError(
            f"constant input {t.show()} has type {t.ort_type}; cellserve feeds constants of {', '.join(CONST_DTYPES)}",
            "export the constant input as int64 or float32",
        )
    parts = [p.strip() for p in text.split(",")]
    try:
        if dtype == "bool":
            table = {"true": 1, "1": 1, "false": 0, "0": 0}
            values: list[float] = [table[p.lower()] for p in parts]
        elif dtype in ("int64", "int32"):
            values = [int(p) for p in parts]
        else:
            values = [float(p) for p in parts]
    except (ValueError, KeyError):
        raise ContractError(
            f"--const {t.name}={text}: {text!r} is not a comma list of {dtype} values",
            f"give {dtype} values, e.g. --const {t.name}={'16000' if 'int' in dtype else '0.5'}",
        ) from None
    if len(values) > MAX_CONST_VALUES:
        raise ContractError(f"--const {t.name} has {len(values)} values", f"at most {MAX_CONST_VALUES} fit a manifest")
    shape: tuple[int, ...]
    if all(isinstance(d, int) for d in t.shape):
        shape = tuple(int(d) for d in t.shape)  # type: ignore[arg-type]
    elif len(t.shape) == 1:
        shape = (len(values),)
    else:
        raise ContractError(
            f"constant input {t.show()} has open dims besides one", "export it with a fixed shape (a scalar or [N])"
        )
    if math.prod(shape) != len(values):
        raise ContractError(
            f"--const {t.name}={text} gives {len(values)} value(s); input {t.show()} takes {math.prod(shape)}",
            f"give {math.prod(shape)} comma-separated values",
        )
    array = np.array(values, dtype=dtype).reshape(shape)
    return ConstSpec(t.name, dtype, shape, tuple(array.reshape(-1).tolist())), array
