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
import platform
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import cellserve
from cellserve.model.manifest import Manifest, TensorInfo, save_manifest, sha256_file
from cellserve.model.model import LSTMConfig, LSTMModel, save_checkpoint

log = logging.getLogger(__name__)

OPSET = 17
ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
PARITY_GRID: tuple[tuple[int, int], ...] = tuple((b, t) for b in (1, 3, 64) for t in (1, 7, 128))
PARITY_ATOL = 1e-5


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
    if cfg.input_kind == "tokens":
        x = rng.integers(0, cfg.input_size, size=(batch, steps), dtype=np.int64)  # [B, T]
    else:
        x = rng.standard_normal((batch, steps, cfg.input_size)).astype(np.float32)  # [B, T, I]
    state = (cfg.layers, batch, cfg.hidden)  # [L, B, H]
    h0 = (0.5 * rng.standard_normal(state)).astype(np.float32)
    c0 = (0.5 * rng.standard_normal(state)).astype(np.float32)
    return {"x": x, "h0": h0, "c0": c0}


def _tensors(cfg: LSTMConfig) -> tuple[list[TensorInfo], list[TensorInfo]]:
    state: list[int | str] = [cfg.layers, "B", cfg.hidden]
    if cfg.input_kind == "tokens":
        x = TensorInfo("x", "input", "int64", ["B", "T"])
    else:
        x = TensorInfo("x", "input", "float32", ["B", "T", cfg.input_size])
    inputs = [x, TensorInfo("h0", "state_h", "float32", state), TensorInfo("c0", "state_c", "float32", state)]
    outputs = [
        TensorInfo("y", "output", "float32", ["B", "T", cfg.output_size]),
        TensorInfo("hn", "next_state_h", "float32", state),
        TensorInfo("cn", "next_state_c", "float32", state),
    ]
    return inputs, outputs


def check_parity(model: LSTMModel, onnx_path: Path, *, seed: int = 0) -> float:
    """Run torch and onnxruntime on :data:`PARITY_GRID`; raise :class:`ExportError` past the tolerance.

    Returns the largest scaled difference ``|ort - torch| / max(1, |torch|)`` seen over y, hn and cn.
    """
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    exact = copy.deepcopy(model).double()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch, steps in PARITY_GRID:
        feeds = example_inputs(model.cfg, batch, steps, rng)
        args = (torch.from_numpy(feeds["h0"]), torch.from_numpy(feeds["c0"]))
        with torch.no_grad():
            y, (hn, cn) = model(torch.from_numpy(feeds["x"]), args)
            x64 = (
                torch.from_numpy(feeds["x"])
                if model.cfg.input_kind == "tokens"
                else torch.from_numpy(feeds["x"]).double()
            )
            y64, (hn64, cn64) = exact(x64, (args[0].double(), args[1].double()))
        got = sess.run(["y", "hn", "cn"], feeds)
        for name, want, have, truth in zip(("y", "hn", "cn"), (y, hn, cn), got, (y64, hn64, cn64), strict=True):
            if have.shape != tuple(want.shape):
                raise ExportError(f"parity: {name} has shape {have.shape} in onnxruntime, {tuple(want.shape)} in torch")
            ref = want.numpy()
            diff = _scaled_max(have, ref)
            worst = max(worst, diff)
            if diff <= PARITY_ATOL:
                continue
            # Over long sequences a trained model's float32 rounding compounds; then onnxruntime passes only
            # if it is no further from the float64 result than torch's own float32 run is (x2).
            floor = _scaled_max(ref, truth.numpy())
            if _scaled_max(have, truth.numpy()) > 2 * floor + PARITY_ATOL:
                raise ExportError(
                    f"parity check failed: output {name!r} at B={batch}, T={steps} differs from torch by {diff:.3g} "
                    f"(|diff| / max(1, |torch|); tolerance {PARITY_ATOL}), and from float64 by more than torch's "
                    "own float32 error; the exported graph does not reproduce the model"
                )
    return worst


def _export(model: LSTMModel, args: tuple[torch.Tensor, ...], onnx_path: Path) -> None:
    x_axes = {0: "B", 1: "T"}
    torch.onnx.export(
        _Graph(model),
        args,
        str(onnx_path),
        input_names=["x", "h0", "c0"],
        output_names=["y", "hn", "cn"],
        dynamic_axes={"x": x_axes, "h0": {1: "B"}, "c0": {1: "B"}, "y": x_axes, "hn": {1: "B"}, "cn": {1: "B"}},
        opset_version=OPSET,
        dynamo=False,
    )


def _scaled_max(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max(1, |ref|) (0 for empty arrays)."""
    return float(np.max(np.abs(a - ref) / np.maximum(1.0, np.abs(ref)))) if a.size else 0.0


def library_versions() -> dict[str, str]:
    return {
        "cellserve": cellserve.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


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
    # The TorchScript exporter (dynamo=False): 0.4 s for the tiny model here vs 6.5 s with dynamo=True, and
    # one ONNX LSTM node per layer. Its warning about batch sizes does not apply: h0/c0 are graph inputs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # Chosen knowingly (see above); the tracer's shape warnings are covered by the parity grid below.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        _export(model, args, onnx_path)
    try:
        onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected {onnx_path}: {e}") from e
    worst = check_parity(model, onnx_path)
    log.info("exported %s in %.2f s; parity max |diff| %.3g over %d shapes", onnx_path, time.perf_counter() - t0,
             worst, len(PARITY_GRID))  # fmt: skip
    inputs, outputs = _tensors(cfg)
    manifest = Manifest(
        name=name,
        version=str(version),
        onnx_file=ONNX_FILE,
        sha256=sha256_file(onnx_path),
        input_kind=cfg.input_kind,
        input_size=cfg.input_size,
        output_size=cfg.output_size,
        layers=cfg.layers,
        hidden=cfg.hidden,
        inputs=inputs,
        outputs=outputs,
        training={**(training or {}), "parity_max_scaled_diff": worst, "opset": OPSET},
        versions=library_versions(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    save_manifest(manifest, out_dir)
    return manifest


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
