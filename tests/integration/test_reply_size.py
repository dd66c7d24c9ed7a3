"""Default limits keep every reply under 4 MiB, the default receive limit of grpcurl, Node and most gRPC clients."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.server.metrics import Metrics
from cellserve.server.models import ModelRepository
from cellserve.server.settings import Settings, default_model_dir
from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

CLIENT_LIMIT = 4 * 1024 * 1024  # grpc's default max receive message length
TOKEN_ROOM = 512  # a checkpoint token's header, key id and model name, besides the state itself


def _largest_output(model_dir, settings: Settings) -> tuple[pb.StreamResponse, int]:
    """The biggest Output a step can get (T = the most steps the server accepts, plus a checkpoint token)."""
    settings = settings.model_copy(update={"model_dirs": [model_dir]})
    (model,) = ModelRepository.load(settings, Metrics(CollectorRegistry()))
    m = model.manifest
    steps = min(settings.max_chunk_steps, model.max_output_steps)
    y = np.zeros((steps, m.output_size), dtype=np.float32)
    token = b"\xff" * (TOKEN_ROOM + 8 * m.layers * m.hidden)
    return pb.StreamResponse(output=pb.Output(seq=2**64 - 1, output=to_proto(y), resume_token=token)), steps


def test_the_shipped_models_longest_chunk_reply_is_under_4_mib():
    settings = Settings()
    assert settings.max_message_bytes <= CLIENT_LIMIT
    reply, steps = _largest_output(default_model_dir(), settings)
    assert reply.ByteSize() < CLIENT_LIMIT, reply.ByteSize()
    assert steps == settings.max_chunk_steps, "the shipped model is not capped below max_chunk_steps"


def _stream_one_step(address: str, model: str, x: np.ndarray) -> pb.StreamResponse:
    """One step that asks for a checkpoint too (the largest Output there is), over a default-limits channel."""
    with grpc.insecure_channel(address) as channel:  # grpc's default limits, as grpcurl's and Node's
        requests = [
            pb.StreamRequest(open=pb.Open(model=model)),
            pb.StreamRequest(step=pb.Step(seq=1, input=to_proto(x), checkpoint=True)),
            pb.StreamRequest(close=pb.Close()),
        ]
        kinds = list(pb_grpc.CellServeStub(channel).Stream(iter(requests), timeout=120))
    assert kinds[0].WhichOneof("kind") == "opened" and kinds[-1].WhichOneof("kind") == "closed"
    return kinds[1]


def test_a_default_client_receives_the_longest_chunk(running_server):
    limit = Settings().max_chunk_steps
    with running_server() as srv:  # default max_chunk_steps and max_message_bytes
        x = np.zeros(limit, dtype=np.int64)
        out = _stream_one_step(srv.address, "tiny", x)
        assert out.WhichOneof("kind") == "output" and to_numpy(out.output.output).shape == (limit, 256)
        assert out.output.resume_token and out.ByteSize() < CLIENT_LIMIT
        refused = _stream_one_step(srv.address, "tiny", np.zeros(limit + 1, dtype=np.int64))
    assert refused.WhichOneof("kind") == "error" and refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"1 <= T <= {limit}" in refused.error.message


def test_a_wide_output_model_caps_its_chunks_so_replies_still_fit(running_server, tmp_path):
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path / "wide", name="wide", input_kind="features", input_size=4,
                                   output_size=3000, hidden=16)
    settings = Settings()
    reply, cap = _largest_output(tmp_path / "wide", settings)
    assert cap < settings.max_chunk_steps and reply.ByteSize() < CLIENT_LIMIT
    with running_server(model_dirs=[tmp_path / "wide"]) as srv:
        out = _stream_one_step(srv.address, "wide", np.zeros((cap, 4), dtype=np.float32))
        assert to_numpy(out.output.output).shape == (cap, 3000) and out.output.resume_token
        refused = _stream_one_step(srv.address, "wide", np.zeros((cap + 1, 4), dtype=np.float32))
    assert refused.WhichOneof("kind") == "error" and f"1 <= T <= {cap}" in refused.error.message


@pytest.mark.parametrize(("rows", "fits"), [(1, True), (4, False)])
def test_stateless_oip_infer_refuses_a_reply_over_the_message_limit(running_server, rows, fits):
    steps = Settings().max_chunk_steps
    request = oip.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="x", datatype="INT64", shape=[rows, steps])
    request.raw_input_contents.append(np.zeros((rows, steps), dtype="<i8").tobytes())
    with running_server() as srv, grpc.insecure_channel(srv.address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        if fits:
            response = infer(request, timeout=120)
            assert [list(o.shape) for o in response.outputs] == [[1, steps, 256], [1, 2, 32], [1, 2, 32]]
            return
        with pytest.raises(grpc.RpcError) as e:
            infer(request, timeout=120)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_message_bytes" in e.value.details() and "fewer rows or steps" in e.value.details()


def test_an_oversized_request_is_resource_exhausted_naming_the_setting_and_counted(running_server):
    limit = 64 * 1024
    too_big = np.zeros(limit // 8 + 16, dtype=np.int64)  # int64 ids: over the limit as one step's input
    oip_request = oip.ModelInferRequest(model_name="tiny")
    oip_request.inputs.add(name="x", datatype="INT64", shape=[1, too_big.size])
    oip_request.raw_input_contents.append(too_big.tobytes())
    with running_server(max_message_bytes=limit) as srv, grpc.insecure_channel(srv.address) as channel:

        def refused() -> float:
            return srv.registry.get_sample_value("cellserve_errors_total", {"code": "RESOURCE_EXHAUSTED"}) or 0.0

        before = refused()
        step = pb.StreamRequest(step=pb.Step(seq=1, input=to_proto(too_big)))
        requests = [pb.StreamRequest(open=pb.Open(model="tiny")), step]
        stream = pb_grpc.CellServeStub(channel).Stream(iter(requests), timeout=60)
        with pytest.raises(grpc.RpcError) as native:
            list(stream)
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as triton:
            infer(oip_request, timeout=60)
        calls = ((native, "/cellserve.v1.CellServe/Stream"), (triton, "/inference.GRPCInferenceService/ModelInfer"))
        for e, method in calls:
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert method in e.value.details() and f"limit of {limit}" in e.value.details()
            assert "--max-message-bytes" in e.value.details() and "CELLSERVE_MAX_MESSAGE_BYTES" in e.value.details()
        assert refused() - before == 2
