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
from collections.abc import Iterable
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
    return _torch_parity(_Graph(model), onnx_path, cases, model.cfg.input_kind)


def _torch_parity(
    graph: nn.Module, onnx_path: Path, cases: Iterable[tuple[int, int, dict[str, np.ndarray]]], kind: InputKind
) -> float:
    """onnxruntime against torch for ``graph(x, h0, c0) -> (y, hn, cn)`` on each (B, T, feeds) case."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    try:
        exact: nn.Module | None = copy.deepcopy(graph).double()
    except Exception:  # a module that cannot be copied or cast: no float64 reference, the plain bound only
        exact = None
    worst = 0.0
    for batch, steps, feeds in cases:
        x, h0, c0 = (torch.from_numpy(feeds[k]) for k in ("x", "h0", "c0"))
        with torch.no_grad():
            want = graph(x, h0, c0)
            truth = _run64(exact, x if kind == "tokens" else x.double(), h0.double(), c0.double())
        got = sess.run(["y", "hn", "cn"], feeds)
        for i, (name, have) in enumerate(zip(("y", "hn", "cn"), got, strict=True)):
            ref = want[i].numpy()
            if have.shape != ref.shape:
                raise ExportError(f"parity: {name} has shape {have.shape} in onnxruntime, {ref.shape} in torch")
            diff = scaled_max(have, ref)
            worst = max(worst, diff)
            if diff <= PARITY_ATOL:
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
    """The float64 copy's (y, hn, cn), or None where there is none or it cannot run in float64."""
    if exact is None:
        return None
    try:
        return [t.numpy() for t in exact(*args)]
    except Exception:  # e.g. a float32 constant made inside forward
        return None


def _export(graph: nn.Module, args: tuple[torch.Tensor, ...], onnx_path: Path, opset: int = OPSET) -> None:
    """``torch.onnx.export`` of ``graph(x, h0, c0) -> (y, hn, cn)`` with the contract's names and dynamic axes."""
    r = DEFAULT_ROLES
    x_axes, state_axes = {0: "B", 1: "T"}, {1: "B"}
    # The TorchScript exporter (dynamo=False): 0.4 s for the tiny model here vs 6.5 s with dynamo=True, and
    # one ONNX LSTM node per layer. Its warning about batch sizes does not apply: h0/c0 are graph inputs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # Chosen knowingly (see above); the tracer's shape warnings are covered by the parity checks.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            args,
            str(onnx_path),
            input_names=[r.input, r.state_h, r.state_c],
            output_names=[r.output, r.next_state_h, r.next_state_c],
            dynamic_axes={
                **{r.input: x_axes, r.output: x_axes},
                **dict.fromkeys((r.state_h, r.state_c, r.next_state_h, r.next_state_c), state_axes),
            },
            opset_version=opset,
            dynamo=False,
        )


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


def _lstm_sizes(module: nn.Module, layers: int | None, hidden: int | None) -> tuple[int, int]:
    """(L, H): as given, else from the module's one ``nn.LSTM``."""
    if layers is not None and hidden is not None:
        return layers, hidden
    lstms = [m for m in module.modules() if isinstance(m, nn.LSTM)]
    if len(lstms) != 1:
        raise ExportError(
            f"{type(module).__name__} holds {len(lstms)} nn.LSTM modules, so the state shape [L, B, H] is not "
            "known; pass layers= and hidden="
        )
    lstm = lstms[0]
    if lstm.bidirectional:
        raise ExportError(
            f"{type(module).__name__}'s nn.LSTM is bidirectional: its backward direction needs the whole sequence, "
            "so its state cannot be carried from one chunk to the next; serve a unidirectional LSTM"
        )
    if lstm.proj_size:
        raise ExportError(
            f"{type(module).__name__}'s nn.LSTM has proj_size={lstm.proj_size}: h and c differ in size, and cellserve "
            "keeps one h/c pair of the same shape [L, B, H]; export an LSTM without proj_size"
        )
    return (layers or lstm.num_layers), (hidden or lstm.hidden_size)


def _example_output(graph: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
    """One torch forward on the example: it must return (y [B, T, O], hn, cn) shaped like the contract."""
    x, h0, _ = args
    try:
        with torch.no_grad():
            out = graph(*args)
    except Exception as e:  # whatever the user's forward raises
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"{name}.forward(x, h0, c0) failed on example inputs x {list(x.shape)}, h0 and c0 {list(h0.shape)} "
            f"([layers, B, hidden]): {first}"
        ) from e
    ok = isinstance(out, tuple | list) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)
    if not ok:
        got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, tuple | list) else "")
        raise ExportError(f"{name}.forward(x, h0, c0) must return a tuple (y, hn, cn) of tensors; it returned {got}")
    y, hn, cn = out
    if y.dim() != 3 or tuple(y.shape[:2]) != tuple(x.shape[:2]):
        raise ExportError(
            f"{name}.forward returned y of shape {list(y.shape)} for x of shape {list(x.shape)}; y must be "
            "[B, T, O], batch first, then time"
        )
    for label, t in (("hn", hn), ("cn", cn)):
        if tuple(t.shape) != tuple(h0.shape):
            raise ExportError(
                f"{name}.forward returned {label} of shape {list(t.shape)}; the next state must have h0's shape "
                f"[L, B, H] = {list(h0.shape)}"
            )


def export_module(
    module: nn.Module,
    out_dir: Path | str,
    *,
    name: str,
    input_size: int,
    input_kind: InputKind = "features",
    layers: int | None = None,
    hidden: int | None = None,
    version: str = "1",
    opset: int = OPSET,
) -> Manifest:
    """Export your own LSTM module to a model directory ``cellserve serve`` serves (``model.onnx`` + manifest).

    ``module.forward(x, h0, c0)`` must return ``(y, hn, cn)``: ``x`` is ``[B, T, input_size]`` float32 features
    (``input_kind="features"``) or ``[B, T]`` int64 token ids in ``[0, input_size)`` (``"tokens"``); ``h0``,
    ``c0``, ``hn``, ``cn`` are ``[layers, B, hidden]``; ``y`` is ``[B, T, O]``. ``layers`` and ``hidden``
    default to those of the module's one ``nn.LSTM``. The module itself is not changed (a float32 CPU copy is
    exported). Checks: torch vs onnxruntime on B ∈ {1, 3} × T ∈ {1, 7, 32}, then every ``cellserve import-onnx``
    check (:func:`cellserve.model.conformance.check_graph`). :class:`ExportError` on failure, and then nothing is
    written to ``out_dir``.
    """
    check_name(name)
    if input_kind not in ("tokens", "features"):
        raise ExportError(f"input_kind must be 'tokens' or 'features', got {input_kind!r}")
    if input_size < 1:
        raise ExportError(f"input_size must be >= 1 (vocabulary or feature width), got {input_size}")
    label = type(module).__name__
    layers, hidden = _lstm_sizes(module, layers, hidden)
    graph = copy.deepcopy(module).float().cpu().eval()
    rng = np.random.default_rng(0)
    args = tuple(torch.from_numpy(a) for a in random_feeds(input_kind, input_size, layers, hidden, 2, 3, rng))
    _example_output(graph, args, label)
    with tempfile.TemporaryDirectory(prefix="cellserve-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        _export(graph, args, onnx_path, opset)
        _onnx_check(onnx_path)
        cases = ((b, t, dict(zip(("x", "h0", "c0"), random_feeds(input_kind, input_size, layers, hidden, b, t, rng),
                                 strict=True))) for b, t in MODULE_PARITY_GRID)  # fmt: skip
        worst = _torch_parity(graph, onnx_path, cases, input_kind)
        try:
            vocab = input_size if input_kind == "tokens" else None
            checked = check_graph(onnx_path, RoleHints.of(DEFAULT_ROLES), vocab=vocab)
        except ContractError as e:
            raise ExportError(f"the exported graph of {label} breaks the serving contract: {e}") from None
        if checked.input_size != input_size:
            raise ExportError(
                f"the exported graph of {label} takes features of width {checked.input_size}, not input_size="
                f"{input_size}"
            )
        provenance = {"kind": "exported_module", "module": _qualname(module), "opset": opset,
                      "parity_max_scaled_diff": worst, **checked.provenance()}  # fmt: skip
        manifest = write_model_dir(onnx_path, out_dir, checked, name=name, version=version, provenance=provenance,
                                   versions=library_versions())  # fmt: skip
    log.info("exported %s as %s; parity max |diff| %.3g", label, manifest.name, worst)
    return manifest
