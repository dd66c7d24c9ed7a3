"""How a cellserve model looks through the Open Inference Protocol: model lookup, metadata, config.

Triton's view is a sequence-batched model with **implicit state**: ModelMetadata and ModelConfig list
one input ``x`` and one output ``y``; the LSTM's h and c are declared only under
``sequence_batching.state`` (h0→hn, c0→cn), as a Triton model with implicit state does. So tools that
build requests from the metadata (``perf_analyzer``) send ``x`` alone, and the server keeps the state.
Shapes: see :mod:`cellserve.server.oip`.
"""

from __future__ import annotations

from cellserve import __version__
from cellserve.model.manifest import Manifest
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import model_config_pb2 as cfg
from cellserve.server.errors import NotFound
from cellserve.server.models import LoadedModel, ModelRepository
from cellserve.server.oip.tensors import tensor_datatype
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


def _dims(m: Manifest) -> dict[str, list[int]]:
    """Per-request dims (batch dimension excluded, T dynamic) of every tensor, by graph name."""
    n = m.names
    state = [m.layers, m.hidden]
    return {n.x: [-1, *m.step_dims], n.h0: state, n.c0: state, n.y: [-1, m.output_size], n.hn: state, n.cn: state}


def model_metadata(model: LoadedModel) -> oip.ModelMetadataResponse:
    m = model.manifest
    dims = _dims(m)

    def meta(name: str) -> oip.ModelMetadataResponse.TensorMetadata:
        return oip.ModelMetadataResponse.TensorMetadata(
            name=name, datatype=tensor_datatype(m, name), shape=[-1, *dims[name]]
        )

    n = m.names
    return oip.ModelMetadataResponse(
        name=m.name, versions=[m.version], platform=PLATFORM, inputs=[meta(n.x)], outputs=[meta(n.y)]
    )


def model_config(model: LoadedModel, settings: Settings) -> cfg.ModelConfig:
    """Triton's view of the model: a sequence-batched model with implicit h/c state."""
    m = model.manifest
    n = m.names
    dims = _dims(m)
    config = cfg.ModelConfig(name=m.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=settings.max_batch)
    # Only x and y: h and c are implicit state (below), never model inputs/outputs in Triton's view.
    config.input.add(name=n.x, data_type=_CONFIG_TYPES[tensor_datatype(m, n.x)], dims=dims[n.x])
    config.output.add(name=n.y, data_type=_CONFIG_TYPES[tensor_datatype(m, n.y)], dims=dims[n.y])
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
