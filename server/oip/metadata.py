"""How a cellserve model looks through the Open Inference Protocol: model lookup, metadata, config.

Triton's view is a sequence-batched model with **implicit state**: ModelMetadata and ModelConfig list
one input ``x`` and one output ``y``; every state pair (an LSTM's h0→hn and c0→cn, a GRU's one
state, a conv cache …) is declared only under ``sequence_batching.state``, as a Triton model with
implicit state does. So tools that
build requests from the metadata (``perf_analyzer``) send ``x`` alone, and the server keeps the state.
Shapes: see :mod:`cellserve.server.oip`.
"""

from __future__ import annotations

from cellserve import __version__
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import model_config_pb2 as cfg
from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import NotFound
from cellserve.server.models import LoadedModel
from cellserve.server.oip.inputs import x_dims, y_dims
from cellserve.server.oip.tensors import tensor_datatype
from cellserve.server.settings import Settings

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "cellserve"
# Protocol extensions this server implements (names as Triton's ServerMetadata reports them).
EXTENSIONS = ("model_configuration", "sequence")
_CONFIG_TYPES = {"INT64": cfg.TYPE_INT64, "FP32": cfg.TYPE_FP32, "FP16": cfg.TYPE_FP16}
_Control = cfg.ModelSequenceBatching.Control


def find_model(plane: DataPlane, name: str, version: str) -> LoadedModel:
    """The model ``name`` (at ``version`` if given); NOT_FOUND in Triton's words otherwise."""
    try:
        model = plane.model(name)
    except NotFound:
        served = ", ".join(sorted(m.name for m in plane.models())) or "none"
        raise NotFound(f"Request for unknown model: '{name}' is not found (this server serves: {served})") from None
    if version and version != model.manifest.version:
        raise NotFound(
            f"Request for unknown model: '{name}' version {version} is not found "
            f"(available version: {model.manifest.version})"
        )
    return model


def model_metadata(model: LoadedModel) -> oip.ModelMetadataResponse:
    m = model.manifest

    def meta(name: str, dims: list[int]) -> oip.ModelMetadataResponse.TensorMetadata:
        return oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=tensor_datatype(m, name), shape=[-1, *dims])

    return oip.ModelMetadataResponse(
        name=m.name,
        versions=[m.version],
        platform=PLATFORM,
        inputs=[meta(m.input.name, x_dims(m))],
        outputs=[meta(m.output.name, y_dims(m))],
    )


def model_config(model: LoadedModel, settings: Settings) -> cfg.ModelConfig:
    """Triton's view of the model: a sequence-batched model whose every state pair is implicit state."""
    m = model.manifest
    max_batch = model.scheduler.max_batch
    config = cfg.ModelConfig(name=m.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=max_batch)
    # Only x and y: the states are implicit state (below), never model inputs/outputs in Triton's view.
    config.input.add(name=m.input.name, data_type=_CONFIG_TYPES[tensor_datatype(m, m.input.name)], dims=x_dims(m))
    config.output.add(name=m.output.name, data_type=_CONFIG_TYPES[tensor_datatype(m, m.output.name)], dims=y_dims(m))
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
    for spec in m.states:
        seq.state.add(
            input_name=spec.input,
            output_name=spec.output,
            data_type=_CONFIG_TYPES[tensor_datatype(m, spec.input)],
            dims=list(spec.session_shape),
        )
    # The model's own batching and pool, as its scheduler and state pool hold them (not the server's settings).
    seq.oldest.max_candidate_sequences = model.pool.capacity
    seq.oldest.max_queue_delay_microseconds = round(model.scheduler.max_wait * 1_000_000)
    seq.oldest.preserve_ordering = True
    info = {
        "cellserve_version": __version__,
        "model_sha256": m.sha256,
        "input_kind": m.input_kind,
        "time_axis": str(m.input.time_axis).lower(),
        "state_layout": "[batch, *state dims] (batch first, the graph's own batch axis removed)",
        "sequence_id_scope": "stream",
        # The stateless extension (no sequence_id): every state sent and returned explicitly, batch first.
        "explicit_state_inputs": ",".join(spec.input for spec in m.states),
        "explicit_state_outputs": ",".join(spec.output for spec in m.states),
        "constant_inputs": ",".join(f"{c.name}={list(c.value)}" for c in m.consts),
    }
    if m.lstm is not None:
        info.update(layers=str(m.layers), hidden=str(m.hidden))
    for key, value in info.items():
        config.parameters[key].string_value = value
    return config
