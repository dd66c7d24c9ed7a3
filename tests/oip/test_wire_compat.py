"""Our OIP protos against tritonclient's own definitions: same fields, same numbers, same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import model_config_pb2 as oip_config


def _kind(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        return "message:" + f.message_type.name
    if f.enum_type is not None:
        return "enum:" + f.enum_type.name
    return str(f.type)


def _assert_subset(ours: Descriptor, theirs: Descriptor) -> None:
    """Every field we declare exists in Triton's message with the same number, type and cardinality."""
    for f in ours.fields:
        t = theirs.fields_by_name.get(f.name)
        assert t is not None, f"{ours.full_name}.{f.name} is not in {theirs.full_name}"
        assert (f.number, _kind(f), f.is_repeated) == (t.number, _kind(t), t.is_repeated), (
            f"{ours.full_name}.{f.name}: ours #{f.number} {_kind(f)} repeated={f.is_repeated}, "
            f"Triton #{t.number} {_kind(t)} repeated={t.is_repeated}"
        )
        if f.message_type is not None:
            _assert_subset(f.message_type, t.message_type)
        if f.enum_type is not None:
            _assert_enum_subset(f.enum_type, t.enum_type)


def _assert_enum_subset(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    for v in ours.values:
        assert theirs.values_by_name[v.name].number == v.number, f"{ours.full_name}.{v.name}"


def _all_messages(file_descriptor) -> list[Descriptor]:
    return list(file_descriptor.message_types_by_name.values())


@pytest.mark.parametrize("ours", _all_messages(oip.DESCRIPTOR), ids=lambda d: d.name)
def test_service_message_fields_match_triton(ours: Descriptor):
    _assert_subset(ours, triton_service.DESCRIPTOR.message_types_by_name[ours.name])


@pytest.mark.parametrize("ours", _all_messages(oip_config.DESCRIPTOR), ids=lambda d: d.name)
def test_model_config_fields_match_triton(ours: Descriptor):
    _assert_subset(ours, triton_config.DESCRIPTOR.message_types_by_name[ours.name])


def test_every_rpc_we_declare_has_tritons_signature():
    ours = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in ours.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.input_type.name, m.output_type.name) == (t.input_type.name, t.output_type.name)
        assert (m.client_streaming, m.server_streaming) == (t.client_streaming, t.server_streaming)


def test_a_tritonclient_request_decodes_identically_with_our_messages():
    """Bytes tritonclient would send parse into the same content (JSON view) with our classes."""
    req = triton_service.ModelInferRequest(model_name="tiny", model_version="1", id="r7")
    req.parameters["sequence_id"].int64_param = 42
    req.parameters["sequence_start"].bool_param = True
    req.parameters["corr"].string_param = "abc"
    req.parameters["priority"].uint64_param = 3
    x = req.inputs.add(name="x", datatype="INT64", shape=[1, 3])
    x.parameters["binary_data_size"].int64_param = 24
    req.outputs.add(name="y")
    req.raw_input_contents.append(np.arange(3, dtype="<i8").tobytes())
    ours = oip.ModelInferRequest.FromString(req.SerializeToString())
    assert json_format.MessageToDict(ours) == json_format.MessageToDict(req)
    assert ours.SerializeToString(deterministic=True) == req.SerializeToString(deterministic=True)


def test_our_model_config_decodes_identically_with_tritons_messages():
    cfg = oip_config.ModelConfig(name="tiny", backend="onnxruntime", max_batch_size=8)
    cfg.input.add(name="x", data_type=oip_config.TYPE_INT64, dims=[-1])
    cfg.output.add(name="y", data_type=oip_config.TYPE_FP32, dims=[-1, 256])
    seq = cfg.sequence_batching
    seq.max_sequence_idle_microseconds = 300_000_000
    start = seq.control_input.add(name="START")
    start.control.add(kind=oip_config.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START, int32_false_true=[0, 1])
    seq.state.add(input_name="h0", output_name="hn", data_type=oip_config.TYPE_FP32, dims=[2, 32])
    seq.oldest.max_queue_delay_microseconds = 500
    cfg.parameters["layers"].string_value = "2"
    theirs = triton_config.ModelConfig.FromString(cfg.SerializeToString())
    assert json_format.MessageToDict(theirs) == json_format.MessageToDict(cfg)
    assert theirs.WhichOneof("scheduling_choice") == "sequence_batching"
