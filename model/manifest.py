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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellserve.model.manifest_checks import (  # the checks, with ManifestError and the bounds (importable here too)
    DIM_LIMITS,
    ManifestError,
    _bad_size,
    _check,
    _is_int,
)
from cellserve.model.manifest_checks import validate as validate_manifest
from cellserve.model.tensor_specs import (
    ConstSpec,
    Frame,
    InputSpec,
    OutputSpec,
    Role,
    StateSpec,
    TensorInfo,
    TensorNames,
    frame_of,
)  # the tensor descriptions (importable from here too)

MANIFEST_FILE = "manifest.json"
FORMAT_1 = "cellserve-manifest/1"
FORMAT = "cellserve-manifest/2"

INPUT_ROLES: tuple[Role, ...] = ("input", "state_h", "state_c")
OUTPUT_ROLES: tuple[Role, ...] = ("output", "next_state_h", "next_state_c")
InputKind = Literal["tokens", "features"]


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to know about one exported model (format 2; format-1 files still load).

    The contract: one per-step input ``x``, one or more state pairs (in -> out, each with its own shape,
    dtype and batch axis), constant inputs, one output ``y``. Our own LSTM is the case of two float32
    ``[L, B, H]`` states with a time axis; ``lstm`` then keeps its sizes (for the numpy oracle).
    """

    name: str
    version: str
    onnx_file: str
    sha256: str
    input: InputSpec
    output: OutputSpec
    states: tuple[StateSpec, ...]
    consts: tuple[ConstSpec, ...] = ()
    fixed_batch: int | None = None  # 1: the graph's batch is fixed at 1 (served by batch-1 calls); None: dynamic
    lstm: dict[str, int] | None = None  # {"layers": L, "hidden": H}: our own LSTM (model/), None for others
    training: dict[str, Any] = field(default_factory=dict)  # data hashes, held-out bits/byte, ...
    versions: dict[str, str] = field(default_factory=dict)  # library versions at export
    created_at: str = ""
    format: str = FORMAT
    # Where the model came from: {"kind": "trained" | "exported_module" | "imported", ...}; for "imported" the
    # source file's name and sha256 (instead of training data hashes). Absent ({}) in older manifests.
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_lstm(cls, *, name: str, version: str, onnx_file: str, sha256: str, roles: TensorNames,
                 input_kind: InputKind, input_size: int, output_size: int, layers: int, hidden: int,
                 **extra: Any) -> Manifest:  # fmt: skip
        """Our LSTM contract ``(x, h0, c0) -> (y, hn, cn)``: h and c float32 ``[L, B, H]``, x with a time axis."""
        if input_kind not in ("tokens", "features"):
            raise ManifestError(f"input_kind must be 'tokens' or 'features', got {input_kind!r}")
        tokens = input_kind == "tokens"
        state = (layers, "B", hidden)
        return cls(
            name=name, version=version, onnx_file=onnx_file, sha256=sha256,
            input=InputSpec(roles.x, "int64" if tokens else "float32", True, () if tokens else (input_size,),
                            input_size if tokens else None),
            output=OutputSpec(roles.y, "float32", (output_size,)),
            states=(StateSpec(roles.h0, roles.hn, "float32", state), StateSpec(roles.c0, roles.cn, "float32", state)),
            lstm={"layers": layers, "hidden": hidden}, **extra,
        )  # fmt: skip

    # -- what the contract means for a step --------------------------------------------------------

    @property
    def step_dims(self) -> Frame:
        """One step of input, after the time axis: ``()`` for a token id, ``(I,)`` for a feature vector."""
        return self.input.frame

    @property
    def vocab(self) -> int | None:
        """Token models: ids must be in ``[0, vocab)``. None for float inputs (values must be finite)."""
        return self.input.vocab

    @property
    def input_dtype(self) -> str:
        return self.input.dtype

    def describe_input(self, max_steps: int) -> str:
        """What one session's step input must be, for error messages."""
        frame = ", ".join("N" if d is None else str(d) for d in self.input.frame)
        shape = f"[T, {frame}]" if frame else "[T]"
        what = "token ids" if self.vocab is not None else ("frames" if not self.input.time_axis else "features")
        return f"model {self.name!r} expects {self.input.dtype} {what} of shape {shape} with 1 <= T <= {max_steps}"

    def describe_output(self) -> str:
        frame = ", ".join("N" if d is None else str(d) for d in self.output.frame)
        return f"float32 [{frame}]"

    @property
    def state_elements(self) -> int:
        """Elements of one session's state, every tensor."""
        return sum(math.prod(s.session_shape) for s in self.states)

    @property
    def state_bytes(self) -> int:
        """Bytes of one session's state, every tensor."""
        return sum(math.prod(s.session_shape) * _itemsize(s.dtype) for s in self.states)

    @property
    def output_elements(self) -> int | None:
        """Elements of one step's output; None when the output has a dynamic dim."""
        if any(d is None for d in self.output.frame):
            return None
        return math.prod(self.output.frame)  # type: ignore[arg-type]

    # -- ModelSummary's scalar fields (the native API's ModelInfo) ----------------------------------

    @property
    def input_kind(self) -> str:
        return "tokens" if self.vocab is not None else "features"

    @property
    def input_size(self) -> int:
        """Vocabulary (tokens), or the width of a one-dim frame; 0 for other frames."""
        frame = self.input.frame
        return self.vocab if self.vocab is not None else (frame[0] or 0) if len(frame) == 1 else 0

    @property
    def output_size(self) -> int:
        """Elements of one step's output (its width for a one-dim output); 0 when dynamic."""
        return self.output_elements or 0

    @property
    def layers(self) -> int:
        return (self.lstm or {}).get("layers", 0)

    @property
    def hidden(self) -> int:
        return (self.lstm or {}).get("hidden", 0)

    @functools.cached_property
    def names(self) -> TensorNames:
        """Graph tensor names of an LSTM-shaped model (h and c paired by order, never by name)."""
        if len(self.states) != 2:
            raise ManifestError(f"model {self.name!r} has {len(self.states)} state pairs, not an LSTM's h and c")
        h, c = self.states
        return TensorNames(self.input.name, h.input, c.input, self.output.name, h.output, c.output)

    # -- the graph's tensors as role-tagged descriptions (ModelInfo, model/) -------------------------

    @functools.cached_property
    def inputs(self) -> list[TensorInfo]:
        x = self.input
        dims: list[int | str] = ["B", *(["T"] if x.time_axis else []), *_named(x.frame, "F")]
        out = [TensorInfo(x.name, "input", x.dtype, dims)]
        for role, s in zip(self._state_roles("state"), self.states, strict=True):
            out.append(TensorInfo(s.input, role, s.dtype, list(s.shape)))
        out += [TensorInfo(c.name, "const", c.dtype, list(c.shape)) for c in self.consts]  # type: ignore[arg-type]
        return out

    @functools.cached_property
    def outputs(self) -> list[TensorInfo]:
        y = self.output
        dims: list[int | str] = ["B", *(["T"] if self.input.time_axis else []), *_named(y.frame, "O")]
        out = [TensorInfo(y.name, "output", y.dtype, dims)]
        for role, s in zip(self._state_roles("next_state"), self.states, strict=True):
            out.append(TensorInfo(s.output, role, s.dtype, list(s.shape)))
        return out

    def _state_roles(self, prefix: str) -> list[Any]:
        if self.lstm is not None and len(self.states) == 2:
            return [f"{prefix}_h", f"{prefix}_c"]
        return [prefix] * len(self.states)

    def tensor(self, role: Role) -> TensorInfo:
        """The graph input or output playing ``role``."""
        for t in (*self.inputs, *self.outputs):
            if t.role == role:
                return t
        raise ManifestError(f"manifest of model {self.name!r} has no tensor with role {role!r}")

    # -- shapes of a batch (our own LSTM's tools) ---------------------------------------------------

    def input_shape(self, batch: int, steps: int) -> tuple[int, ...]:
        """x: ``[B, T, *frame]`` (dynamic frame dims as 1) or ``[B, *frame]``."""
        frame = tuple(d or 1 for d in self.input.frame)
        return (batch, steps, *frame) if self.input.time_axis else (batch, *frame)

    def output_shape(self, batch: int, steps: int) -> tuple[int, ...]:
        """y: ``[B, T, O]``."""
        return (batch, steps, self.output_size)

    def state_shape(self, batch: int) -> tuple[int, ...]:
        """h and c (in and out) of our LSTM: ``[L, B, H]``."""
        return (self.layers, batch, self.hidden)

    # -- (de)serialisation ---------------------------------------------------------------------------

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        fmt = d.get("format")
        if fmt not in (FORMAT, FORMAT_1):
            raise ManifestError(f"unsupported manifest format {fmt!r}; expected {FORMAT!r} (or {FORMAT_1!r})")
        try:
            m = _from_v1(d) if fmt == FORMAT_1 else _from_v2(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"malformed manifest: {type(e).__name__}: {e}") from e
        m.validate()
        return m

    def validate(self) -> None:
        """Check internal consistency: names unique, dtypes known, sizes positive and bounded (manifest_checks.py)."""
        validate_manifest(self)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}[dtype]


def _named(frame: Frame, prefix: str) -> list[int | str]:
    return [f"{prefix}{i}" if d is None else d for i, d in enumerate(frame)]


_COMMON = ("name", "version", "onnx_file", "sha256", "training", "versions", "created_at", "provenance")


def _from_v2(d: dict[str, Any]) -> Manifest:
    x, y = d["input"], d["output"]
    return Manifest(
        **{k: d[k] for k in _COMMON if k in d},
        input=InputSpec(
            x["name"],
            x["dtype"],
            x["time_axis"],
            frame_of(x.get("frame", ())),
            x.get("vocab"),
            None if x.get("example") is None else tuple(int(d) for d in x["example"]),
        ),
        output=OutputSpec(y["name"], y.get("dtype", "float32"), frame_of(y.get("frame", ()))),
        states=tuple(StateSpec(s["input"], s["output"], s["dtype"], tuple(s["shape"])) for s in d["states"]),
        consts=tuple(
            ConstSpec(c["name"], c["dtype"], tuple(c["shape"]), tuple(c["value"])) for c in d.get("consts", ())
        ),
        fixed_batch=d.get("fixed_batch"),
        lstm=d.get("lstm"),
    )


def _from_v1(d: dict[str, Any]) -> Manifest:
    """A format-1 manifest (our LSTM contract, roles per tensor) as format 2."""
    roles: dict[str, str] = {}
    for t in (*d["inputs"], *d["outputs"]):
        TensorInfo(**t)  # the fields a format-1 tensor must have
        once = f"manifest of model {d.get('name')!r} must have exactly one {t['role']!r} tensor"
        _check(t["role"] not in roles, once)
        roles[t["role"]] = t["name"]
    for role in (*INPUT_ROLES, *OUTPUT_ROLES):
        _check(role in roles, f"manifest of model {d.get('name')!r} must have exactly one {role!r} tensor")
    for key in ("layers", "hidden", "input_size", "output_size"):
        value, most = d[key], DIM_LIMITS[key]
        _check(_is_int(value) and 1 <= value <= most, _bad_size(key, value))
    names = TensorNames(roles["input"], roles["state_h"], roles["state_c"], roles["output"], roles["next_state_h"],
                        roles["next_state_c"])  # fmt: skip
    return Manifest.for_lstm(
        **{k: d[k] for k in _COMMON if k in d}, roles=names, input_kind=d["input_kind"], input_size=d["input_size"],
        output_size=d["output_size"], layers=d["layers"], hidden=d["hidden"],
    )  # fmt: skip


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
