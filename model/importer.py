"""``cellserve import-onnx``: check a stateful ONNX model against the contract, then write a servable model directory.

The checks are :func:`cellserve.model.conformance.check_graph`; every one runs before anything is written.
:func:`import_onnx` then copies the file and writes ``manifest.json`` with ``provenance.kind = "imported"``
and the source file's sha256. :func:`cellserve.model.export.export_module` ends in :func:`write_model_dir`
too. Needs only onnxruntime and numpy.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import cellserve
from cellserve.model.conformance import CheckedGraph, check_graph, open_session
from cellserve.model.contract import ContractError, RoleHints
from cellserve.model.manifest import InputKind, Manifest, TensorNames, save_manifest, sha256_file

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def runtime_versions() -> dict[str, str]:
    return {
        "cellserve": cellserve.__version__,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


# -- writing the model directory --------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ContractError(
            f"model name {name!r} is not allowed",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (clients ask for it by name)",
        )
    return name


def new_manifest(onnx_file: Path, *, name: str, version: str, roles: TensorNames, input_kind: InputKind,
                 input_size: int, output_size: int, layers: int, hidden: int, provenance: dict[str, Any],
                 versions: dict[str, str], training: dict[str, Any] | None = None) -> Manifest:  # fmt: skip
    """Our own LSTM's manifest (``Manifest.for_lstm``), stamped with ``onnx_file``'s sha256 and the time."""
    return Manifest.for_lstm(
        name=check_name(name),
        version=str(version),
        onnx_file=ONNX_FILE,
        sha256=sha256_file(onnx_file),
        roles=roles,
        input_kind=input_kind,
        input_size=input_size,
        output_size=output_size,
        layers=layers,
        hidden=hidden,
        training=training or {},
        versions=versions,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        provenance=provenance,
    )


def checked_manifest(onnx_file: Path, checked: CheckedGraph, *, name: str, version: str,
                     provenance: dict[str, Any], versions: dict[str, str]) -> Manifest:  # fmt: skip
    """The format-2 manifest of a checked graph, stamped with ``onnx_file``'s sha256 and the time.

    The LSTM case (h and c float32 ``[L, B, H]``, a time axis) keeps ``lstm={"layers", "hidden"}`` as our own
    exports do, so ModelInfo and the benches report its sizes.
    """
    c = checked
    return Manifest(
        name=check_name(name), version=str(version), onnx_file=ONNX_FILE, sha256=sha256_file(onnx_file),
        input=c.input, output=c.output, states=c.states, consts=c.consts, fixed_batch=c.fixed_batch, lstm=c.lstm,
        versions=versions, created_at=datetime.now(UTC).isoformat(timespec="seconds"), provenance=provenance,
    )  # fmt: skip


def write_model_dir(onnx_file: Path, out_dir: Path | str, checked: CheckedGraph, *, name: str, version: str,
                    provenance: dict[str, Any], versions: dict[str, str]) -> Manifest:  # fmt: skip
    """Copy a checked ONNX file to ``out_dir/model.onnx`` and write its manifest beside it."""
    out_dir = Path(out_dir)
    manifest = checked_manifest(onnx_file, checked, name=name, version=version, provenance=provenance,
                                versions=versions)  # fmt: skip
    manifest.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_FILE
    if not (target.exists() and os.path.samefile(onnx_file, target)):
        partial = out_dir / f".{ONNX_FILE}.partial"
        shutil.copyfile(onnx_file, partial)
        os.replace(partial, target)  # a reader never sees half a file
    save_manifest(manifest, out_dir)
    return manifest


def import_onnx(src: Path | str, out_dir: Path | str, *, name: str, hints: RoleHints | None = None,
                consts: Mapping[str, object] | None = None, vocab: int | None = None,
                version: str = "1") -> tuple[Manifest, CheckedGraph]:  # fmt: skip
    """Check ``src`` and write ``out_dir`` (``model.onnx`` + ``manifest.json``); nothing is written on refusal.

    ``hints`` names roles the detection cannot tell; ``consts`` gives constant inputs their values
    (``{"sr": 16000}``, as ``--const sr=16000``).

    The checks run on a private copy of the file, so a model whose weights live in external data files
    (which a copy would leave behind) is refused rather than written half.
    """
    src = Path(src)
    check_name(name)
    hints = (hints or RoleHints()).with_consts(consts)
    with tempfile.TemporaryDirectory(prefix="cellserve-import-") as tmp:
        staged = Path(tmp) / ONNX_FILE
        if src.is_file():
            shutil.copyfile(src, staged)
        try:
            checked = check_graph(staged if src.is_file() else src, hints, vocab=vocab)
        except ContractError as e:
            if "cannot load" in e.problem and src.is_file():
                open_session(src)  # refuses again, about the file itself, when that is what fails to load
                raise ContractError(
                    f"{src.name} loads only beside its other files (its weights are in external data files)",
                    "save the weights inside the model (onnx.save(model, path, save_as_external_data=False)) "
                    "and import that file",
                ) from None
            raise
        provenance = {
            "kind": "imported",
            "source_file": src.name,
            "source_sha256": sha256_file(src),
            "source_bytes": src.stat().st_size,
            **checked.provenance(),
        }
        manifest = write_model_dir(staged, out_dir, checked, name=name, version=version, provenance=provenance,
                                   versions=runtime_versions())  # fmt: skip
    log.debug("imported %s as %s: %s", src, manifest.name, checked.roles.describe())
    return manifest, checked
