"""The model manifest: what an exported model is, read and written as ``manifest.json``.

Pure Python (no torch, no onnxruntime) so the server can import it. The server trusts nothing in
a model directory until :func:`load_manifest` has checked the ONNX file's sha256 against it.

It is the one place that knows a model's tensors: the graph's name for each role
(:attr:`Manifest.names`) and what the input kind means for shapes and values
(:attr:`Manifest.step_dims`, :attr:`Manifest.vocab`, :meth:`Manifest.input_shape`). The engine,
the session checks and the OIP view all ask it, so a new input kind is a change here.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST_FILE = "manifest.json"
FORMAT = "cellserve-manifest/1"

Role = Literal["input", "state_h", "state_c", "output", "next_state_h", "next_state_c"]
INPUT_ROLES: tuple[Role, ...] = ("input", "state_h", "state_c")
OUTPUT_ROLES: tuple[Role, ...] = ("output", "next_state_h", "next_state_c")
InputKind = Literal["tokens", "features"]


class ManifestError(ValueError):
    """A model directory is missing, malformed, or does not match its manifest."""


@dataclass(frozen=True)
class TensorInfo:
    """One ONNX graph input or output. ``shape`` uses strings for dynamic axes ("B", "T")."""

    name: str
    role: Role
    dtype: str  # numpy dtype name: "int64", "float32"
    shape: list[int | str]


@dataclass(frozen=True)
class TensorNames:
    """The graph's tensor names by role: ``(x, h0, c0) -> (y, hn, cn)``."""

    x: str
    h0: str
    c0: str
    y: str
    hn: str
    cn: str


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to know about one exported model."""

    name: str
    version: str
    onnx_file: str
    sha256: str
    input_kind: InputKind
    input_size: int  # vocabulary size (tokens) or feature width (features)
    output_size: int  # logits width (tokens) or output width (features)
    layers: int
    hidden: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    training: dict[str, Any] = field(default_factory=dict)  # data hashes, held-out bits/byte, ...
    versions: dict[str, str] = field(default_factory=dict)  # library versions at export
    created_at: str = ""
    format: str = FORMAT
    # Where the model came from: {"kind": "trained" | "exported_module" | "imported", ...}; for "imported" the
    # source file's name and sha256 (instead of training data hashes). Absent ({}) in older manifests.
    provenance: dict[str, Any] = field(default_factory=dict)

    def tensor(self, role: Role) -> TensorInfo:
        """The graph input or output playing ``role`` (pairs h and c by role, never by name)."""
        for t in (*self.inputs, *self.outputs):
            if t.role == role:
                return t
        raise ManifestError(f"manifest of model {self.name!r} has no tensor with role {role!r}")

    @functools.cached_property
    def names(self) -> TensorNames:
        """Graph tensor names by role (h and c paired by role, never by name)."""
        t = self.tensor
        return TensorNames(
            t("input").name, t("state_h").name, t("state_c").name,
            t("output").name, t("next_state_h").name, t("next_state_c").name,
        )  # fmt: skip

    @functools.cached_property
    def input_dtype(self) -> str:
        return self.tensor("input").dtype

    # -- what the input kind means: the only place that compares input_kind ----------------------

    @functools.cached_property
    def step_dims(self) -> tuple[int, ...]:
        """One step of input, after the time axis: ``()`` for a token id, ``(I,)`` for a feature vector."""
        return () if self.input_kind == "tokens" else (self.input_size,)

    @functools.cached_property
    def vocab(self) -> int | None:
        """Token models: ids must be in ``[0, vocab)``. None for feature models (values must be finite)."""
        return self.input_size if self.input_kind == "tokens" else None

    def describe_input(self, max_steps: int) -> str:
        """What one session's step input must be, for error messages."""
        what = "token ids of shape [T]" if self.vocab is not None else f"features of shape [T, {self.input_size}]"
        return f"model {self.name!r} expects {self.input_dtype} {what} with 1 <= T <= {max_steps}"

    # -- shapes of a batch --------------------------------------------------------------------------

    def input_shape(self, batch: int, steps: int) -> tuple[int, ...]:
        """x: ``[B, T]`` (tokens) or ``[B, T, I]`` (features)."""
        return (batch, steps, *self.step_dims)

    def output_shape(self, batch: int, steps: int) -> tuple[int, ...]:
        """y: ``[B, T, O]``."""
        return (batch, steps, self.output_size)

    def state_shape(self, batch: int) -> tuple[int, ...]:
        """h and c (in and out): ``[L, B, H]``."""
        return (self.layers, batch, self.hidden)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise ManifestError(f"unsupported manifest format {d.get('format')!r}; expected {FORMAT!r}")
        try:
            fields = dict(d)
            fields["inputs"] = [TensorInfo(**t) for t in d["inputs"]]
            fields["outputs"] = [TensorInfo(**t) for t in d["outputs"]]
            m = Manifest(**fields)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e
        m.validate()
        return m

    def validate(self) -> None:
        """Check internal consistency: every role present once, sizes positive, kind known."""
        roles = [t.role for t in self.inputs] + [t.role for t in self.outputs]
        for role in (*INPUT_ROLES, *OUTPUT_ROLES):
            if roles.count(role) != 1:
                raise ManifestError(f"manifest of model {self.name!r} must have exactly one {role!r} tensor")
        if self.input_kind not in ("tokens", "features"):
            raise ManifestError(f"input_kind must be 'tokens' or 'features', got {self.input_kind!r}")
        for key in ("input_size", "output_size", "layers", "hidden"):
            if int(getattr(self, key)) < 1:
                raise ManifestError(f"manifest field {key} must be >= 1")
        if not isinstance(self.provenance, dict) or not isinstance(self.provenance.get("kind", ""), str):
            raise ManifestError("manifest field provenance must be an object with a string 'kind'")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest(manifest: Manifest, model_dir: Path) -> Path:
    manifest.validate()
    path = Path(model_dir) / MANIFEST_FILE
    path.write_text(manifest.to_json())
    return path


def load_manifest(model_dir: Path | str, *, verify: bool = True) -> Manifest:
    """Read ``model_dir/manifest.json``; with ``verify``, refuse an ONNX file whose sha256 differs."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not model_dir.is_dir():
        raise ManifestError(f"{model_dir} does not exist or is not a directory (expected an exported model directory)")
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {model_dir} (expected an exported model directory)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    manifest = Manifest.from_dict(data)
    if verify:
        onnx_path = model_dir / manifest.onnx_file
        if not onnx_path.is_file():
            raise ManifestError(f"model {manifest.name!r}: ONNX file {onnx_path} is missing")
        actual = sha256_file(onnx_path)
        if actual != manifest.sha256:
            raise ManifestError(
                f"model {manifest.name!r}: {onnx_path.name} has sha256 {actual[:16]}…, manifest says "
                f"{manifest.sha256[:16]}…; the file was changed after export — re-export the model"
            )
    return manifest
