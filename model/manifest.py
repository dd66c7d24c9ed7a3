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
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

MANIFEST_FILE = "manifest.json"
FORMAT = "cellserve-manifest/1"

Role = Literal["input", "state_h", "state_c", "output", "next_state_h", "next_state_c"]
INPUT_ROLES: tuple[Role, ...] = ("input", "state_h", "state_c")
OUTPUT_ROLES: tuple[Role, ...] = ("output", "next_state_h", "next_state_c")
InputKind = Literal["tokens", "features"]


class ManifestError(ValueError):
    """A model directory is missing, malformed, or does not match its manifest."""


# Bounds of a manifest's sizes, each from what has to hold them: a hand-edited absurd value fails in one line
# at load, not as a MemoryError when the server sizes its state pool (layers × capacity × hidden floats).
MAX_STATE_FLOATS = 2**28  # layers × hidden: h and c as float32 (8 bytes per pair) in one 2 GiB message
DIM_LIMITS: dict[str, int] = {
    "layers": 2**16 - 1,  # a resume token stores layers as u16
    "hidden": MAX_STATE_FLOATS,
    "input_size": 2**29,  # one step of float32 features in one 2 GiB message; a vocabulary fits too
    "output_size": 2**29,  # one step of float32 output in one 2 GiB message
}
DIM_REASONS = {
    "layers": "a resume token stores it in 16 bits",
    "hidden": "h and c of a session travel in one resume token, at most 2 GiB",
    "input_size": "one step's float32 features must fit one gRPC message, at most 2 GiB",
    "output_size": "one step's float32 output must fit one gRPC message, at most 2 GiB",
}


def _is_int(value: object) -> bool:
    """An integer (Python's or numpy's), not a bool, float or string."""
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return not isinstance(value, bool)


def check_onnx_file(onnx_file: object) -> None:
    """``onnx_file`` must be a plain relative path (no ``..``, not absolute): the graph lives in its model directory."""
    if not isinstance(onnx_file, str) or not onnx_file:
        raise ManifestError(f"manifest field onnx_file is {onnx_file!r}; give the ONNX file's name, e.g. 'model.onnx'")
    posix, windows = PurePosixPath(onnx_file), PureWindowsPath(onnx_file)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts or "\0" in onnx_file:
        raise ManifestError(
            f"manifest field onnx_file is {onnx_file!r}; it must be a relative path inside the model directory "
            "(no '..', not absolute), e.g. 'model.onnx'"
        )


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
        for key, most in DIM_LIMITS.items():
            value = getattr(self, key)
            if not _is_int(value) or not 1 <= value <= most:
                raise ManifestError(
                    f"manifest field {key} is {value!r}; it must be an integer in 1..{most} ({DIM_REASONS[key]})"
                )
        if self.layers * self.hidden > MAX_STATE_FLOATS:
            raise ManifestError(
                f"manifest fields layers × hidden are {self.layers} × {self.hidden}; a session's h and c would be "
                f"{8 * self.layers * self.hidden} bytes, and a resume token carrying them must fit one gRPC message "
                f"(at most 2 GiB): layers × hidden must be at most {MAX_STATE_FLOATS}"
            )
        check_onnx_file(self.onnx_file)
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
        onnx_path = onnx_path_in(model_dir, manifest)
        if not onnx_path.is_file():
            raise ManifestError(f"model {manifest.name!r}: ONNX file {onnx_path} is missing")
        actual = sha256_file(onnx_path)
        if actual != manifest.sha256:
            raise ManifestError(
                f"model {manifest.name!r}: {onnx_path.name} has sha256 {actual[:16]}…, manifest says "
                f"{manifest.sha256[:16]}…; the file was changed after export — re-export the model"
            )
    return manifest


def onnx_path_in(model_dir: Path | str, manifest: Manifest) -> Path:
    """The model's ONNX file, resolved (symlinks too); ManifestError if it is outside ``model_dir``."""
    root = Path(model_dir).resolve()
    path = (root / manifest.onnx_file).resolve()
    if not path.is_relative_to(root):
        raise ManifestError(
            f"manifest field onnx_file {manifest.onnx_file!r} resolves to {path}, "
            "outside the model directory; keep the ONNX file in the directory, e.g. 'model.onnx'"
        )
    return path
