"""ONNX export with a built-in parity check, and the manifest written beside the graph.

Graph contract: inputs ``x`` ([B, T] int64 tokens, or [B, T, I] float32 features), ``h0``, ``c0``
([L, B, H] float32); outputs ``y`` ([B, T, O] float32), ``hn``, ``cn`` ([L, B, H]); B and T dynamic.
Export fails loudly (:class:`ExportError`) unless onnx.checker passes and onnxruntime matches torch within
:data:`PARITY_ATOL` on every (B, T) in :data:`PARITY_GRID` — ``|ort - torch| <= 1e-5 · max(1, |torch|)``
elementwise: absolute for values up to 1, relative above (a trained model's cell state ``c`` is unbounded
and float32 keeps ~7 significant digits, so a fixed absolute bound would reject correct graphs).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cellserve.model.conformance import PARITY_ATOL, check_graph, random_feeds, scaled_max
from cellserve.model.contract import DEFAULT_ROLES, ContractError, RoleHints
from cellserve.model.importer import ONNX_FILE, check_name, new_manifest, runtime_versions, write_model_dir
from cellserve.model.manifest import InputKind, Manifest, save_manifest
from cellserve.model.model import LSTMConfig, LSTMModel, save_checkpoint
from cellserve.model.state_layouts import LayoutError, concrete, infer_layout

log = logging.getLogger(__name__)

OPSET = 17
CHECKPOINT_FILE = "checkpoint.pt"
PARITY_GRID: tuple[tuple[int, int], ...] = tuple((b, t) for b in (1, 3, 64) for t in (1, 7, 128))
MODULE_PARITY_GRID: tuple[tuple[int, int], ...] = tuple((b, t) for b in (1, 3) for t in (1, 7, 32))


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the torch model."""


class _Graph(nn.Module):
    """Flat signature ``(x, h0, c0) -> (y, hn, cn)`` for the exporter (the model takes a state tuple)."""

    def __init__(self, model: LSTMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, (hn, cn) = self.model(x, (h0, c0))  # y [B, T, O]; hn, cn [L, B, H]
        return y, hn, cn


def example_inputs(cfg: LSTMConfig, batch: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random graph inputs for one (B, T): tokens or features, and non-zero h0/c0 (exercises state paths)."""
    x, h0, c0 = random_feeds(cfg.input_kind, cfg.input_size, cfg.layers, cfg.hidden, batch, steps, rng)
    return {"x": x, "h0": h0, "c0": c0}


def check_parity(model: LSTMModel, onnx_path: Path, *, seed: int = 0) -> float:
    """Run torch and onnxruntime on :data:`PARITY_GRID`; raise :class:`ExportError` past the tolerance.

    Returns the largest scaled difference ``|ort - torch| / max(1, |torch|)`` seen over y, hn and cn.
    """
    rng = np.random.default_rng(seed)
    cases = ((b, t, example_inputs(model.cfg, b, t, rng)) for b, t in PARITY_GRID)
    return _torch_parity(_Graph(model), onnx_path, cases)


def _torch_parity(graph: nn.Module, onnx_path: Path, cases: Iterable[tuple[int, int, dict[str, np.ndarray]]],
                  outputs: Sequence[str] = ("y", "hn", "cn")) -> float:  # fmt: skip
    """onnxruntime against torch for ``graph(*feeds) -> outputs`` on each (B, T, feeds) case (feeds in graph order)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    try:
        exact: nn.Module | None = copy.deepcopy(graph).double()
    except Exception:  # a module that cannot be copied or cast: no float64 reference, the plain bound only
        exact = None
    worst = 0.0
    for batch, steps, feeds in cases:
        args = [torch.from_numpy(a) for a in feeds.values()]
        with torch.no_grad():
            want = graph(*args)
            truth = _run64(exact, *(a.double() if a.dtype == torch.float32 else a for a in args))
        got = sess.run(list(outputs), feeds)
        for i, (name, have) in enumerate(zip(outputs, got, strict=True)):
            ref = want[i].numpy()
            if have.shape != ref.shape:
                raise ExportError(f"parity: {name} has shape {have.shape} in onnxruntime, {ref.shape} in torch")
            diff = scaled_max(have, ref)
            worst = max(worst, diff)
            if diff <= PARITY_ATOL * (1000 if ref.dtype == np.float16 else 1):
                continue
            # Over long sequences a trained model's float32 rounding compounds; then onnxruntime passes only
            # if it is no further from the float64 result than torch's own float32 run is (x2).
            if truth is None or scaled_max(have, truth[i]) > 2 * scaled_max(ref, truth[i]) + PARITY_ATOL:
                raise ExportError(
                    f"parity check failed: output {name!r} at B={batch}, T={steps} differs from torch by {diff:.3g} "
                    f"(|diff| / max(1, |torch|); tolerance {PARITY_ATOL}), and from float64 by more than torch's "
                    "own float32 error; the exported graph does not reproduce the model"
                )
    return worst


def _run64(exact: nn.Module | None, *args: torch.Tensor) -> list[np.ndarray] | None:
    """The float64 copy's outputs, or None where there is none or it cannot run in float64."""
    if exact is None:
        return None
    try:
        return [t.numpy() for t in exact(*args)]
    except Exception:  # e.g. a float32 constant made inside forward
        return None


def _export(graph: nn.Module, args: tuple[torch.Tensor, ...], onnx_path: Path, opset: int = OPSET,
            names: tuple[list[str], list[str]] | None = None,
            dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:  # fmt: skip
    """``torch.onnx.export`` with the contract's names and dynamic axes (default: our LSTM's)."""
    r = DEFAULT_ROLES
    if names is None:
        names = [r.x, r.h0, r.c0], [r.y, r.hn, r.cn]
        x_axes, state_axes = {0: "B", 1: "T"}, {1: "B"}
        dynamic_axes = {**{r.x: x_axes, r.y: x_axes}, **dict.fromkeys((r.h0, r.c0, r.hn, r.cn), state_axes)}
    # The TorchScript exporter (dynamo=False): 0.4 s for the tiny model here vs 6.5 s with dynamo=True, and
    # one ONNX LSTM node per layer. Its warning about batch sizes does not apply: the state is a graph input.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # Chosen knowingly (see above); the tracer's shape warnings are covered by the parity checks.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(graph, args, str(onnx_path), input_names=names[0], output_names=names[1],
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)  # fmt: skip


def library_versions() -> dict[str, str]:
    return {**runtime_versions(), "torch": torch.__version__, "onnx": onnx.__version__}


def export_onnx(
    model: LSTMModel,
    out_dir: Path | str,
    *,
    name: str,
    version: str = "1",
    training: dict[str, Any] | None = None,
) -> Manifest:
    """Export ``model`` to ``out_dir/model.onnx``, check it, and write ``out_dir/manifest.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILE
    cfg = model.cfg
    model = model.float().cpu().eval()
    example = example_inputs(cfg, 2, 3, np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[k]) for k in ("x", "h0", "c0"))
    t0 = time.perf_counter()
    _export(_Graph(model), args, onnx_path)
    _onnx_check(onnx_path)
    worst = check_parity(model, onnx_path)
    log.info("exported %s in %.2f s; parity max |diff| %.3g over %d shapes", onnx_path, time.perf_counter() - t0,
             worst, len(PARITY_GRID))  # fmt: skip
    manifest = new_manifest(
        onnx_path,
        name=name,
        version=version,
        roles=DEFAULT_ROLES,
        input_kind=cfg.input_kind,
        input_size=cfg.input_size,
        output_size=cfg.output_size,
        layers=cfg.layers,
        hidden=cfg.hidden,
        training={**(training or {}), "parity_max_scaled_diff": worst, "opset": OPSET},
        versions=library_versions(),
        provenance={"kind": "trained", "module": _qualname(model)},
    )
    save_manifest(manifest, out_dir)
    return manifest


def _onnx_check(onnx_path: Path) -> None:
    try:
        onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected {onnx_path}: {e}") from e


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def export_random_model(
    out_dir: Path | str,
    *,
    name: str = "tiny",
    input_kind: str = "tokens",
    input_size: int = 256,
    output_size: int | None = None,
    layers: int = 2,
    hidden: int = 32,
    embed: int = 16,
    seed: int = 0,
) -> Manifest:
    """A random-weight model (for tests and demos): writes ``checkpoint.pt``, ``model.onnx``, ``manifest.json``."""
    torch.manual_seed(seed)
    cfg = LSTMConfig(
        input_kind=input_kind,  # type: ignore[arg-type]
        input_size=input_size,
        output_size=output_size if output_size is not None else input_size,
        layers=layers,
        hidden=hidden,
        embed=embed,
    )
    model = LSTMModel(cfg).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out_dir / CHECKPOINT_FILE)
    return export_onnx(model, out_dir, name=name, training={"random_weights": True, "seed": seed})


def _example_x(input_kind: InputKind, input_size: int | None, time_axis: bool, batch: int,
               steps: int) -> torch.Tensor:  # fmt: skip
    """A random x of the contract: token ids ``[B, T]`` or features ``[B, T, I]`` (``[B]`` / ``[B, I]`` per frame)."""
    if input_kind not in ("tokens", "features"):
        raise ExportError(f"input_kind must be 'tokens' or 'features', got {input_kind!r}")
    if input_size is None or input_size < 1:
        raise ExportError(f"input_size must be >= 1 (vocabulary or feature width), got {input_size}; or pass example=")
    lead = (batch, steps) if time_axis else (batch,)
    if input_kind == "tokens":
        return torch.randint(0, input_size, lead, dtype=torch.int64)
    return torch.randn(*lead, input_size)


def _resize(example: torch.Tensor, batch: int, steps: int | None) -> torch.Tensor:
    """``example`` repeated or cut to ``batch`` rows (and ``steps`` along axis 1)."""
    x = example[torch.arange(batch) % example.shape[0]]
    if steps is not None:
        x = x[:, torch.arange(steps) % example.shape[1]]
    return x.contiguous()


def export_module(
    module: nn.Module,
    out_dir: Path | str,
    *,
    name: str,
    input_size: int | None = None,
    input_kind: InputKind = "features",
    layers: int | None = None,
    hidden: int | None = None,
    states: Sequence[Sequence[int | str]] | None = None,
    example: torch.Tensor | None = None,
    time_axis: bool = True,
    version: str = "1",
    opset: int = OPSET,
) -> Manifest:
    """Export your own stateful module to a model directory ``cellserve serve`` serves (``model.onnx`` + manifest).

    ``module.forward(x, *states)`` returns ``(y, *next_states)``, one next state per state, each of its state's
    shape. ``x`` is ``[B, T, input_size]`` float32 features (``input_kind="features"``) or ``[B, T]`` int64 ids in
    ``[0, input_size)`` (``"tokens"``); ``time_axis=False`` drops T (a per-frame module: ``[B, input_size]``);
    ``example`` gives any other x (``[B, T, *frame]`` or ``[B, *frame]``). ``y`` is ``[B, T, *out]`` (``[B, *out]``).

    The state shapes come from ``states`` (one shape per state, ``"B"`` at the batch axis, e.g. ``[(2, "B", 64)]``),
    else ``[layers, B, hidden]`` each, else from the module's one recurrent layer (``nn.LSTM``, ``nn.GRU``,
    ``nn.RNN`` or their cells): h and c ``[L, B, H]`` or batch first ``[B, L, H]``, an LSTM's h and c stacked as
    ``[2, L, B, H]``, a GRU's one ``[L, B, H]`` — the first layout forward accepts and returns in the same shape.
    The module itself is not changed (a float32 CPU copy is exported). Checks: torch vs onnxruntime on B ∈ {1, 3}
    × T ∈ {1, 7, 32}, then every ``cellserve import-onnx`` check. :class:`ExportError` on failure, and then
    nothing is written to ``out_dir``.
    """
    check_name(name)
    label = type(module).__name__
    graph = copy.deepcopy(module).float().cpu().eval()
    torch.manual_seed(0)
    given = example is not None
    if example is None:
        example = _example_x(input_kind, input_size, time_axis, 3, 4)
    elif example.dim() < (2 if time_axis else 1):
        raise ExportError(f"example x has shape {list(example.shape)}; it must be [B, T, *frame] (or [B, *frame])")
    x = _resize(example.float() if example.is_floating_point() else example, 3, 4 if time_axis else None)
    try:
        layout = infer_layout(graph, x, label, states=states, layers=layers, hidden=hidden)
    except LayoutError as e:
        raise ExportError(f"{label}: {e}" if not str(e).startswith(label) else str(e)) from None
    ins, outs = ["x", *layout.inputs], ["y", *layout.outputs]
    axes = {0: "B", 1: "T"} if time_axis else {0: "B"}
    dynamic = {"x": axes, "y": axes}
    for i, o, shape in zip(layout.inputs, layout.outputs, layout.states, strict=True):
        dynamic[i] = dynamic[o] = {shape.index("B"): "B"}

    def feeds(batch: int, steps: int | None) -> dict[str, np.ndarray]:
        xb = _resize(x, batch, steps)
        if x.is_floating_point():
            xb = xb + 0.1 * torch.randn(xb.shape)
        st = [0.5 * torch.randn(concrete(s, batch)) for s in layout.states]
        return dict(zip(ins, (t.numpy() for t in (xb, *st)), strict=True))

    with tempfile.TemporaryDirectory(prefix="cellserve-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        args = tuple(torch.from_numpy(a) for a in feeds(3, 4 if time_axis else None).values())
        _export(graph, args, onnx_path, opset, (ins, outs), dynamic)
        _onnx_check(onnx_path)
        grid = MODULE_PARITY_GRID if time_axis else tuple((b, 0) for b in (1, 3))
        cases = ((b, t, feeds(b, t or None)) for b, t in grid)
        worst = _torch_parity(graph, onnx_path, cases, outs)
        pairs = tuple(f"{i}:{o}:{s.index('B')}" for i, o, s in zip(layout.inputs, layout.outputs, layout.states,
                                                                    strict=True))  # fmt: skip
        hints = RoleHints(input="x", states=pairs, output="y", per_frame=not time_axis)
        try:
            vocab = input_size if input_kind == "tokens" and not given else None
            checked = check_graph(onnx_path, hints, vocab=vocab)
        except ContractError as e:
            raise ExportError(f"the exported graph of {label} breaks the serving contract: {e}") from None
        if input_kind == "features" and not given and checked.input_size != input_size:
            raise ExportError(
                f"the exported graph of {label} takes features of width {checked.input_size}, not input_size="
                f"{input_size}"
            )
        provenance = {"kind": "exported_module", "module": _qualname(module), "opset": opset, "states": layout.how,
                      "parity_max_scaled_diff": worst, **checked.provenance()}  # fmt: skip
        manifest = write_model_dir(onnx_path, out_dir, checked, name=name, version=version, provenance=provenance,
                                   versions=library_versions())  # fmt: skip
    log.info("exported %s as %s; parity max |diff| %.3g", label, manifest.name, worst)
    return manifest
