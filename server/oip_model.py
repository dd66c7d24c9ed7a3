"""How a cellserve model looks through the Open Inference Protocol: metadata, config, input checks.

Triton's view is a sequence-batched model with **implicit state**: ModelMetadata and ModelConfig list
one input ``x`` and one output ``y``; the LSTM's h and c are declared only under
``sequence_batching.state`` (h0→hn, c0→cn), as a Triton model with implicit state does. So tools that
build requests from the metadata (``perf_analyzer``) send ``x`` alone, and the server keeps the state.

Shape convention (Triton's ``max_batch_size > 0`` form: every tensor starts with a batch dimension
that the config's ``dims`` leave out):

- ``x``: ``[B, T]`` token ids (INT64) or ``[B, T, I]`` features (FP32); ``T`` ≥ 1 steps per request.
- ``y``: ``[B, T, O]`` FP32.
- A sequence request (one with a ``sequence_id``) has ``B = 1``, like every request Triton's
  sequence batcher takes; it sends ``x`` only and gets ``y`` back (``hn``/``cn`` too if it asks for
  them by name).
- Extension, stateless (no ``sequence_id``): the state tensors may be sent and asked for explicitly:
  ``h0``, ``c0`` inputs (zeros if absent) and ``hn``, ``cn`` outputs, ``[B, L, H]`` FP32, batch first;
  row ``b`` is ``h[:, b, :]`` of the ONNX graph's ``[L, B, H]``. The config's ``parameters`` name them
  (``explicit_state_inputs``, ``explicit_state_outputs``).
Tensor names are the manifest's (the graph's), paired with their meaning by manifest role.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellserve import __version__
from cellserve.model.manifest import Manifest
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import model_config_pb2 as cfg
from cellserve.server.errors import InvalidArgument, NotFound
from cellserve.server.models import LoadedModel, ModelRepository
from cellserve.server.oip_tensors import datatype_of
from cellserve.server.settings import Settings

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "cellserve"
# Protocol extensions this server implements (names as Triton's ServerMetadata reports them).
EXTENSIONS = ("model_configuration", "sequence")
_CONFIG_TYPES = {"INT64": cfg.TYPE_INT64, "FP32": cfg.TYPE_FP32}
_Control = cfg.ModelSequenceBatching.Control


def find_model(models: ModelRepository, name: str, version: str) -> LoadedModel:
    """The model ``name`` (at ``version`` if given); NOT_FOUND in Triton's words otherwise."""
    try:
        model = models.get(name)
    except NotFound:
        served = ", ".join(sorted(m.name for m in models)) or "none"
        raise NotFound(f"Request for unknown model: '{name}' is not found (this server serves: {served})") from None
    if version and version != model.manifest.version:
        raise NotFound(
            f"Request for unknown model: '{name}' version {version} is not found "
            f"(available version: {model.manifest.version})"
        )
    return model


@dataclass(frozen=True)
class Names:
    """Graph tensor names by role."""

    x: str
    h0: str
    c0: str
    y: str
    hn: str
    cn: str

    @staticmethod
    def of(m: Manifest) -> Names:
        return Names(
            m.tensor("input").name,
            m.tensor("state_h").name,
            m.tensor("state_c").name,
            m.tensor("output").name,
            m.tensor("next_state_h").name,
            m.tensor("next_state_c").name,
        )


def _x_dims(m: Manifest) -> list[int]:
    return [-1] if m.input_kind == "tokens" else [-1, m.input_size]  # [T] or [T, I], batch excluded


def _dims(m: Manifest) -> dict[str, list[int]]:
    """Per-request dims (batch dimension excluded) of every tensor, by graph name."""
    n = Names.of(m)
    state = [m.layers, m.hidden]
    return {n.x: _x_dims(m), n.h0: state, n.c0: state, n.y: [-1, m.output_size], n.hn: state, n.cn: state}


def _datatype(m: Manifest, name: str) -> str:
    return datatype_of(next(t.dtype for t in (*m.inputs, *m.outputs) if t.name == name))


def model_metadata(model: LoadedModel) -> oip.ModelMetadataResponse:
    m = model.manifest
    dims = _dims(m)

    def meta(name: str) -> oip.ModelMetadataResponse.TensorMetadata:
        return oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=_datatype(m, name), shape=[-1, *dims[name]])

    n = Names.of(m)
    return oip.ModelMetadataResponse(
        name=m.name, versions=[m.version], platform=PLATFORM, inputs=[meta(n.x)], outputs=[meta(n.y)]
    )


def model_config(model: LoadedModel, settings: Settings) -> cfg.ModelConfig:
    """Triton's view of the model: a sequence-batched model with implicit h/c state."""
    m = model.manifest
    n = Names.of(m)
    dims = _dims(m)
    config = cfg.ModelConfig(name=m.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=settings.max_batch)
    # Only x and y: h and c are implicit state (below), never model inputs/outputs in Triton's view.
    config.input.add(name=n.x, data_type=_CONFIG_TYPES[_datatype(m, n.x)], dims=dims[n.x])
    config.output.add(name=n.y, data_type=_CONFIG_TYPES[_datatype(m, n.y)], dims=dims[n.y])
    gpu = settings.device == "cuda"
    config.instance_group.add(
        name=m.name,
        count=1,
        kind=cfg.ModelInstanceGroup.KIND_GPU if gpu else cfg.ModelInstanceGroup.KIND_CPU,
        gpus=[settings.device_id] if gpu else [],
    )
    seq = config.sequence_batching
    seq.max_sequence_idle_microseconds = settings.idle_timeout_s * 1_000_000
    for name, kind in (
        ("START", _Control.CONTROL_SEQUENCE_START),
        ("END", _Control.CONTROL_SEQUENCE_END),
        ("READY", _Control.CONTROL_SEQUENCE_READY),
    ):
        seq.control_input.add(name=name).control.add(kind=kind, int32_false_true=[0, 1])
    seq.control_input.add(name="CORRID").control.add(kind=_Control.CONTROL_SEQUENCE_CORRID, data_type=cfg.TYPE_UINT64)
    seq.state.add(input_name=n.h0, output_name=n.hn, data_type=cfg.TYPE_FP32, dims=dims[n.h0])
    seq.state.add(input_name=n.c0, output_name=n.cn, data_type=cfg.TYPE_FP32, dims=dims[n.c0])
    seq.oldest.max_candidate_sequences = settings.capacity
    seq.oldest.max_queue_delay_microseconds = settings.max_wait_us
    seq.oldest.preserve_ordering = True
    info = {
        "cellserve_version": __version__,
        "model_sha256": m.sha256,
        "input_kind": m.input_kind,
        "layers": str(m.layers),
        "hidden": str(m.hidden),
        "state_layout": "[batch, layers, hidden]",
        "sequence_id_scope": "stream",
        # The stateless extension (no sequence_id): state sent and returned explicitly, [batch, layers, hidden].
        "explicit_state_inputs": f"{n.h0},{n.c0}",
        "explicit_state_outputs": f"{n.hn},{n.cn}",
    }
    for key, value in info.items():
        config.parameters[key].string_value = value
    return config


def split_inputs(
    model: LoadedModel, tensors: dict[str, np.ndarray], *, max_batch: int, max_steps: int, sequence: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Check a request's inputs against the model; returns (x, h0, c0) with batch first.

    ``x`` is ``[B, T]`` or ``[B, T, I]``; ``h0``/``c0`` are ``[B, L, H]`` float32 or None. Per-row
    checks (vocabulary, NaN) are the model's own (:meth:`LoadedModel.check_input`).
    """
    m = model.manifest
    n = Names.of(m)
    for name in tensors:
        if name not in (n.x, n.h0, n.c0):
            raise InvalidArgument(
                f"unexpected inference input '{name}' for model '{m.name}'; inputs are {n.x}, {n.h0}, {n.c0}"
            )
    x = tensors.get(n.x)
    if x is None:
        raise InvalidArgument(f"expected input '{n.x}' for model '{m.name}' is missing")
    _check_dtype(m, n.x, x)
    want = [-1, *_x_dims(m)]
    batch_ok = 1 <= (x.shape[0] if x.ndim else 0) <= (1 if sequence else max_batch)
    if x.ndim != len(want) or any(w not in (-1, d) for w, d in zip(want, x.shape, strict=True)) or not batch_ok:
        batch = "1 (a sequence request carries one sequence)" if sequence else f"1..{max_batch} (max_batch_size)"
        raise InvalidArgument(
            f"unexpected shape for input '{n.x}' for model '{m.name}'. Expected {want}, got {list(x.shape)}; "
            f"the first dimension is the batch ({batch}), then T steps"
        )
    if not 1 <= x.shape[1] <= max_steps:
        raise InvalidArgument(f"input '{n.x}' has T={x.shape[1]} steps; model '{m.name}' takes 1..{max_steps}")
    batch, steps = x.shape[:2]
    reply_floats = batch * (steps * m.output_size + (0 if sequence else 2 * m.layers * m.hidden))  # y (+ hn, cn)
    if reply_floats > model.max_output_steps * m.output_size:  # what fits one message (max_message_bytes)
        raise InvalidArgument(
            f"the reply to {batch} row(s) of T={steps} steps would be {4 * reply_floats} bytes of float32 outputs, "
            f"over the server's max_message_bytes; send fewer rows or steps per request"
        )
    states: list[np.ndarray | None] = []
    for name in (n.h0, n.c0):
        s = tensors.get(name)
        if s is not None:
            if sequence:
                raise InvalidArgument(
                    f"input '{name}' is implicit state in a sequence; the server keeps it. Leave it out, "
                    "or send it without a sequence_id for stateless inference"
                )
            _check_dtype(m, name, s)
            expect = [x.shape[0], m.layers, m.hidden]
            if list(s.shape) != expect:
                raise InvalidArgument(
                    f"unexpected shape for input '{name}' for model '{m.name}'. Expected {expect} "
                    f"([batch, layers, hidden], batch as in '{n.x}'), got {list(s.shape)}"
                )
            if not np.isfinite(s).all():
                raise InvalidArgument(f"input '{name}' contains NaN or Inf; state must be finite")
        states.append(s)
    return x, states[0], states[1]


def _check_dtype(m: Manifest, name: str, a: np.ndarray) -> None:
    want = _datatype(m, name)
    got = datatype_of(a.dtype)
    if got != want:
        raise InvalidArgument(f"inference input '{name}' data-type is '{got}', but model '{m.name}' expects '{want}'")


def output_names(model: LoadedModel, requested: list[str], *, sequence: bool) -> list[str]:
    """Outputs to return: those requested by name, else all (stateless) or just ``y`` (sequence)."""
    n = Names.of(model.manifest)
    known = (n.y, n.hn, n.cn)
    for name in requested:
        if name not in known:
            raise InvalidArgument(
                f"unexpected inference output '{name}' for model '{model.name}'; outputs are {', '.join(known)}"
            )
    if requested:
        return list(dict.fromkeys(requested))
    return [n.y] if sequence else list(known)
