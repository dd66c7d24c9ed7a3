"""Whether an ONNX graph keeps the serving contract (:mod:`cellserve.model.contract`): every check, in order.

:func:`check_graph` resolves the roles (flags or detected), then checks the signature — dtypes, the input
kind (int64 ``[B, T]`` or float32 ``[B, T, I]``), the state layout ``[L, B, H]`` with dynamic batch and time
axes, one h/c pair of the same shape — then runs the graph: B ∈ {1, 3} × T ∈ {1, 2, 7}, rows of a batch
independent, the state actually used, and chunked == whole (one sequence in random chunks with the state
carried equals the same sequence run whole). The first broken rule raises :class:`ContractError`, one line
saying what is wrong and how to re-export. Only onnxruntime and numpy are needed (no torch, no ``onnx``
package), so ``cellserve import-onnx`` runs in the serving image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cellserve.model.contract import (
    ContractError,
    GraphTensor,
    RoleHints,
    Roles,
    dynamic,
    one_line,
    reexport_hint,
    resolve_input_roles,
    resolve_output_roles,
    signature,
)
from cellserve.model.manifest import InputKind

PARITY_ATOL = 1e-5  # |a - b| <= 1e-5 · max(1, |b|) elementwise: absolute up to 1, relative above
RUN_GRID: tuple[tuple[int, int], ...] = tuple((b, t) for b in (1, 3) for t in (1, 2, 7))
CHUNKED_BATCH, CHUNKED_STEPS, CHUNKS = 2, 24, 5  # one sequence per row, cut at 4 random points
MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class CheckedGraph:
    """A graph that keeps the contract: its roles, sizes, and what the checks saw."""

    roles: Roles
    detected: dict[str, str]  # role -> how it was chosen: flag, name, dtype, shape, order, rest (the one left)
    input_kind: InputKind
    input_size: int  # vocabulary (tokens) or feature width I (features)
    output_size: int
    layers: int
    hidden: int
    vocab_source: str = ""  # tokens only: "flag" or "probed"
    report: dict[str, Any] = field(default_factory=dict)  # what the runtime checks ran and the largest differences
    producer: str = ""  # from the file's metadata: the exporter that wrote it, and the graph's name
    graph_name: str = ""

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about the checks: how roles were chosen, what ran, the graph's producer."""
        extra = {"vocab": self.vocab_source} if self.vocab_source else {}
        return {"producer": self.producer, "graph_name": self.graph_name, "roles": self.detected, **extra,
                "checks": self.report}  # fmt: skip


def random_feeds(kind: InputKind, input_size: int, layers: int, hidden: int, batch: int, steps: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Random (x, h0, c0): token ids in [0, input_size) or standard-normal features, and non-zero state."""
    if kind == "tokens":
        x = rng.integers(0, input_size, size=(batch, steps), dtype=np.int64)  # [B, T]
    else:
        x = rng.standard_normal((batch, steps, input_size)).astype(np.float32)  # [B, T, I]
    state = (layers, batch, hidden)  # [L, B, H]
    h0 = (0.5 * rng.standard_normal(state)).astype(np.float32)
    c0 = (0.5 * rng.standard_normal(state)).astype(np.float32)
    return x, h0, c0


def scaled_max(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max(1, |ref|) (0 for empty arrays)."""
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
            f"onnxruntime {ort.__version__} cannot load {path.name}: {_first_line(e)}",
            "pass an ONNX model that onnxruntime can run (torch.onnx.export with opset >= 14 makes one)",
        ) from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return one_line(lines[0] if lines else type(e).__name__)[:300]


# -- static checks: the signature ------------------------------------------------------------------------


def _check_x(x: GraphTensor, state_batch: object, fix: str) -> tuple[InputKind, int]:
    """x's kind and feature width (0 for tokens) from its declared dtype and shape."""
    if x.dtype is None:
        raise ContractError(
            f"input {x.show()} has type {x.ort_type}; cellserve feeds int64 token ids [B, T] or float32 features "
            "[B, T, I]",
            "export with int64 ids (x.long()) or float32 features (module.float())",
        )
    kind: InputKind = "tokens" if x.dtype == "int64" else "features"
    want = "int64 token ids [B, T]" if kind == "tokens" else "float32 features [B, T, I]"
    rank = 2 if kind == "tokens" else 3
    if len(x.shape) == rank - 1:
        raise ContractError(
            f"input {x.show()} has no time axis; cellserve sends chunks of T steps as {want}",
            f"export a module that runs a sequence (nn.LSTM, not nn.LSTMCell) on x of shape {want}; {fix}",
        )
    if len(x.shape) != rank:
        raise ContractError(f"input {x.show()} has rank {len(x.shape)}; a {kind} model's x is {want}", fix)
    b, t = x.shape[0], x.shape[1]
    if isinstance(t, str) and t == state_batch and b != state_batch:
        raise ContractError(
            f"input {x.show()} is time-first (its axis 1 is the state's batch axis {t!r}); cellserve sends {want}, "
            "batch first",
            "use nn.LSTM(..., batch_first=True) or transpose x inside forward, then re-export",
        )
    if not dynamic(b):
        raise ContractError(f"the graph has a static batch: input {x.show()} fixes B={b}", fix)
    if not dynamic(t):
        raise ContractError(
            f"input {x.show()} has no time axis: T is fixed at {t}, and cellserve sends chunks of any length", fix
        )
    if kind == "features":
        width = x.shape[2]
        if dynamic(width):
            raise ContractError(
                f"input {x.show()} has a dynamic feature width; cellserve needs a fixed I in [B, T, I]",
                "export with a fixed feature width (dynamic axes only on B and T)",
            )
        return kind, int(width)  # type: ignore[arg-type]
    return kind, 0


def _check_state(s: GraphTensor, x: GraphTensor, fix: str) -> tuple[int, int]:
    """(L, H) of a state input, which must be float32 [L, B, H] with only B dynamic."""
    if s.dtype != "float32":
        raise ContractError(
            f"state input {s.show()} is {s.ort_type}; cellserve keeps the state as float32 [L, B, H]",
            "export with float32 state (module.float())",
        )
    if len(s.shape) == 2:
        raise ContractError(
            f"state input {s.show()} has no layers axis; cellserve keeps the state as [L, B, H] (L=1 for one layer), "
            "as torch.nn.LSTM takes it",
            f"take h0 and c0 as [L, B, H] in forward (h0.unsqueeze(0) for a one-layer cell); {fix}",
        )
    if len(s.shape) != 3:
        raise ContractError(f"state input {s.show()} has rank {len(s.shape)}; cellserve keeps state as [L, B, H]", fix)
    layers, batch, hidden = s.shape
    if (dynamic(layers) and not dynamic(batch)) or (isinstance(layers, str) and layers == x.shape[0] != batch):
        raise ContractError(
            f"state input {s.show()} is batch-first ([B, L, H]); cellserve keeps state as [L, B, H], layers first, "
            "as torch.nn.LSTM's h0 and c0",
            f"take h0 and c0 as [L, B, H] (transpose inside forward if the module wants them batch-first); {fix}",
        )
    if not dynamic(batch):
        raise ContractError(f"the graph has a static batch: state input {s.show()} fixes B={batch}", fix)
    if dynamic(layers) or dynamic(hidden):
        raise ContractError(f"state input {s.show()} has a dynamic layers or hidden size; only B may be dynamic", fix)
    return int(layers), int(hidden)  # type: ignore[arg-type]


# -- runtime checks ----------------------------------------------------------------------------------------


class _Runner:
    """Runs the graph by role, with random inputs of any (B, T); a failing run is a ContractError."""

    def __init__(self, session: ort.InferenceSession, names: tuple[str, str, str], kind: InputKind, width: int,
                 layers: int, hidden: int, fix: str) -> None:  # fmt: skip
        self.session, self.names, self.kind, self.width = session, names, kind, width
        self.layers, self.hidden, self.fix = layers, hidden, fix
        self.vocab = 1  # token ids drawn from [0, vocab) once it is known
        self.outputs: list[str] | None = None  # y, hn, cn once known (None: every output)

    def feeds(self, rng: np.random.Generator, batch: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.vocab if self.kind == "tokens" else self.width
        return random_feeds(self.kind, size, self.layers, self.hidden, batch, steps, rng)

    def try_run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> list[np.ndarray] | Exception:
        try:
            return list(self.session.run(self.outputs, dict(zip(self.names, (x, h0, c0), strict=True))))
        except Exception as e:  # onnxruntime's own error types
            return e

    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> list[np.ndarray]:
        got = self.try_run(x, h0, c0)
        if isinstance(got, Exception):
            raise ContractError(
                f"the graph fails to run at B={x.shape[0]}, T={x.shape[1]}: {_first_line(got)}",
                "batch and time must be dynamic inside the graph too (no Reshape or Expand to a fixed size, "
                f"batch first in x, layers first in the state); {self.fix}",
            )
        return got


def _probe_shape(*avoid: int) -> tuple[int, int]:
    """A (B, T) unlike L, H, I, O: output shapes then tell y [B, T, O] from a state [L, B, H]."""
    batch = next(b for b in range(3, 64) if b not in avoid)
    return batch, next(t for t in range(5, 64) if t not in (*avoid, batch))


def _vocab(runner: _Runner, given: int | None) -> tuple[int, str]:
    """The vocabulary size: ``given`` (checked: its last id runs), else probed from where the graph's Gather fails."""
    zeros = np.zeros((runner.layers, 1, runner.hidden), np.float32)

    def accepts(token: int) -> bool:
        return not isinstance(runner.try_run(np.full((1, 1), token, np.int64), zeros, zeros), Exception)

    if not accepts(0):
        runner.run(np.zeros((1, 1), np.int64), zeros, zeros)  # raises, with onnxruntime's reason
    if given is not None:
        if given < 1 or not accepts(given - 1):
            raise ContractError(
                f"--vocab {given}, but the graph rejects token id {given - 1}", "pass the size of its embedding table"
            )
        return given, "flag"
    if accepts(MAX_TOKEN_ID):
        raise ContractError(
            f"cannot tell the vocabulary of token input '{runner.names[0]}': the graph accepts any id",
            "pass --vocab N (token ids 0..N-1; the server refuses ids outside it)",
        )
    lo, hi = 0, MAX_TOKEN_ID  # lo is accepted, hi is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if accepts(mid) else (lo, mid)
    return hi, "probed"


def _check_runs(runner: _Runner, rng: np.random.Generator, output_size: int, roles: Roles) -> list[list[int]]:
    for batch, steps in RUN_GRID:
        x, h0, c0 = runner.feeds(rng, batch, steps)
        got = runner.run(x, h0, c0)
        state = (runner.layers, batch, runner.hidden)
        for name, a, want in zip(
            (roles.output, roles.next_state_h, roles.next_state_c), got, ((batch, steps, output_size), state, state),
            strict=True,
        ):
            if a.shape != want:
                raise ContractError(
                    f"at B={batch}, T={steps} output '{name}' has shape {list(a.shape)}, not {list(want)}",
                    f"batch and time must stay dynamic all the way through the graph; {runner.fix}",
                )
            if not np.isfinite(a).all():
                raise ContractError(
                    f"at B={batch}, T={steps} output '{name}' holds NaN or Inf for finite inputs",
                    "check the exported weights",
                )
    return [list(bt) for bt in RUN_GRID]


def _check_batch_rows(runner: _Runner, rng: np.random.Generator) -> float:
    """Row 1 of a B=3 run equals that row run alone: sessions batched together never mix."""
    x, h0, c0 = runner.feeds(rng, 3, 7)
    together = runner.run(x, h0, c0)
    alone = runner.run(x[1:2], h0[:, 1:2], c0[:, 1:2])
    rows = (together[0][1:2], together[1][:, 1:2], together[2][:, 1:2])
    diff = max(scaled_max(a, b) for a, b in zip(alone, rows, strict=True))
    if diff > PARITY_ATOL:
        raise ContractError(
            f"rows of a batch are not independent: row 1 of a B=3 run differs by {diff:.3g} from the same row run "
            "alone, and cellserve batches many sessions into one run",
            "nothing in forward may be computed across the batch axis: a state used batch-first inside, a "
            "batch statistic, or onnxruntime's dynamic quantization (its activation scale spans the whole batch; "
            "quantize weights only, or export the float model)",
        )
    return diff


def _check_state_used(runner: _Runner, rng: np.random.Generator, roles: Roles) -> None:
    x, h0, c0 = runner.feeds(rng, 1, 3)
    zeros = np.zeros_like(h0)
    base = runner.run(x, zeros, zeros)[0]
    for name, h, c in ((roles.state_h, h0, zeros), (roles.state_c, zeros, c0)):
        if np.array_equal(runner.run(x, h, c)[0], base):
            raise ContractError(
                f"the graph ignores its state input '{name}': y is the same whatever it holds",
                "pass h0 and c0 on to the LSTM in forward (self.lstm(x, (h0, c0))) and re-export, so that a step "
                "continues the session's state",
            )


def _check_chunked(runner: _Runner, rng: np.random.Generator, roles: Roles) -> tuple[list[int], float]:
    """One sequence run in random chunks, state carried, equals the same sequence run whole."""
    x, h0, c0 = runner.feeds(rng, CHUNKED_BATCH, CHUNKED_STEPS)
    whole = runner.run(x, h0, c0)
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, CHUNKED_STEPS), size=CHUNKS - 1, replace=False))
    bounds = [0, *cuts, CHUNKED_STEPS]
    ys, h, c = [], h0, c0
    for a, b in itertools.pairwise(bounds):
        y, h, c = runner.run(x[:, a:b], h, c)
        ys.append(y)
    chunks = [b - a for a, b in itertools.pairwise(bounds)]
    diffs = {
        roles.output: scaled_max(np.concatenate(ys, axis=1), whole[0]),
        roles.next_state_h: scaled_max(h, whole[1]),
        roles.next_state_c: scaled_max(c, whole[2]),
    }
    name, diff = max(diffs.items(), key=lambda kv: kv[1])
    if diff > PARITY_ATOL:
        raise ContractError(
            f"chunked != whole: one sequence run in chunks {chunks} with the state carried from "
            f"{roles.next_state_h}/{roles.next_state_c} into {roles.state_h}/{roles.state_c} differs from the same "
            f"sequence run whole by {diff:.3g} in '{name}' (tolerance {PARITY_ATOL})",
            "re-export so that hn and cn are the whole state after the last step of x (every recurrent part of "
            "forward takes its state from h0/c0 and returns it; a bidirectional LSTM's cannot be carried); if the "
            "graph pairs its state otherwise, name the pairs: import-onnx --state H_IN:H_OUT --state C_IN:C_OUT",
        )
    return chunks, max(diffs.values())


def check_graph(path: Path | str, hints: RoleHints | None = None, *, vocab: int | None = None,
                seed: int = 0) -> CheckedGraph:  # fmt: skip
    """Check the ONNX file at ``path`` against the contract; :class:`ContractError` at the first broken rule."""
    hints = hints or RoleHints()
    session = open_session(path)
    inputs, outputs = signature(session)
    x_name, h_name, c_name, pairs, how = resolve_input_roles(inputs, outputs, hints)
    tensors = {t.name: t for t in (*inputs, *outputs)}
    guess = [t.name for t in outputs] if len(outputs) == 3 else ["y", "hn", "cn"]
    fix = reexport_hint((x_name, h_name, c_name, *guess))
    x, h0, c0 = tensors[x_name], tensors[h_name], tensors[c_name]
    kind, width = _check_x(x, h0.shape[1] if len(h0.shape) == 3 else None, fix)
    (layers, hidden), c_shape = _check_state(h0, x, fix), _check_state(c0, x, fix)
    if c_shape != (layers, hidden):
        raise ContractError(
            f"state inputs {h0.show()} and {c0.show()} differ; cellserve keeps one h/c pair of the same shape "
            "[L, B, H]",
            "export an LSTM whose h and c have the same size (no proj_size)",
        )
    runner = _Runner(session, (x_name, h_name, c_name), kind, width, layers, hidden, fix)
    rng = np.random.default_rng(seed)
    batch, steps = _probe_shape(layers, hidden, width)
    probe = dict(zip([t.name for t in outputs], runner.run(*runner.feeds(rng, batch, steps)), strict=True))
    y_name, hn_name, cn_name, out_how = resolve_output_roles(
        outputs, {n: a.shape for n, a in probe.items()}, (layers, batch, hidden), h_name, c_name, pairs, hints
    )
    roles = Roles(x_name, h_name, c_name, y_name, hn_name, cn_name)
    runner.fix = fix = reexport_hint((x_name, h_name, c_name, y_name, hn_name, cn_name))
    output_size = _check_outputs(tensors, roles, probe, batch, steps, (layers, batch, hidden))
    runner.outputs = [y_name, hn_name, cn_name]
    input_size, vocab_source = _vocab(runner, vocab) if kind == "tokens" else (width, "")
    runner.vocab = input_size
    report: dict[str, Any] = {"runs": _check_runs(runner, rng, output_size, roles)}
    report["batch_rows_max_scaled_diff"] = _check_batch_rows(runner, rng)
    _check_state_used(runner, rng, roles)
    report["chunks"], report["chunked_max_scaled_diff"] = _check_chunked(runner, rng, roles)
    report["tolerance"] = PARITY_ATOL
    meta = session.get_modelmeta()
    return CheckedGraph(roles, {**how, **out_how}, kind, input_size, output_size, layers, hidden, vocab_source,
                        report, meta.producer_name, meta.graph_name)  # fmt: skip


def _check_outputs(tensors: dict[str, GraphTensor], roles: Roles, probe: dict[str, np.ndarray], batch: int,
                   steps: int, state: tuple[int, int, int]) -> int:  # fmt: skip
    """y's width O; y, hn, cn must be float32, y [B, T, O] and the next states shaped like the state."""
    for name in (roles.output, roles.next_state_h, roles.next_state_c):
        if tensors[name].dtype != "float32":
            raise ContractError(
                f"output {tensors[name].show()} is not float32; cellserve returns y and the next state as float32",
                "cast inside forward (y.float()) and re-export",
            )
    for name in (roles.next_state_h, roles.next_state_c):
        if probe[name].shape != state:
            raise ContractError(
                f"next state '{name}' has shape {list(probe[name].shape)} at B={batch}, T={steps}; it must have the "
                f"state's shape [L, B, H] = {list(state)}",
                "return hn and cn exactly as the LSTM gives them ([L, B, H])",
            )
    y = probe[roles.output].shape
    if y == (batch, steps):
        raise ContractError(
            f"output '{roles.output}' is [B, T] (one value per step); cellserve returns y as [B, T, O]",
            "return y.unsqueeze(-1) from forward and re-export",
        )
    if len(y) != 3 or y[:2] != (batch, steps):
        raise ContractError(
            f"output '{roles.output}' has shape {list(y)} at B={batch}, T={steps}; cellserve returns y as [B, T, O], "
            "batch first, then time",
            "return y batch first (nn.LSTM(..., batch_first=True)) and re-export",
        )
    return int(y[2])
