"""The OIP service without tritonclient: typed tensor contents, both service names, reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.server.errors import InvalidArgument
from cellserve.server.oip.tensors import add_output, decode_inputs, parameters

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def _request(*tensors: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> oip.ModelInferRequest:
    req = oip.ModelInferRequest(model_name="tiny")
    for name, datatype, shape in tensors:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.extend(raw or [])
    return req


def test_typed_contents_and_raw_bytes_decode_to_the_same_arrays():
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    raw = _request(("x", "INT64", [2, 3]), raw=[x.astype("<i8").tobytes()])
    typed = _request(("x", "INT64", [2, 3]))
    typed.inputs[0].contents.int64_contents.extend(x.ravel().tolist())
    np.testing.assert_array_equal(decode_inputs(raw)["x"], x)
    np.testing.assert_array_equal(decode_inputs(typed)["x"], x)
    h = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 2, 4)
    typed_h = _request(("h0", "FP32", [1, 2, 4]))
    typed_h.inputs[0].contents.fp32_contents.extend(h.ravel().tolist())
    np.testing.assert_array_equal(decode_inputs(typed_h)["h0"], h)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(("x", "INT64", [2, 3]), raw=[b"\0" * 47]), "47 bytes"),
        (_request(("x", "INT64", [1]), ("h0", "FP32", [1]), raw=[b"\0" * 8]), "1 entries for 2 inputs"),
        (_request(("x", "INT64", [1]), ("x", "INT64", [1]), raw=[b"\0" * 8] * 2), "given twice"),
        (_request(("x", "BYTES", [1]), raw=[b"\0" * 8]), "datatype 'BYTES'"),
        (_request(("x", "INT64", [-1]), raw=[b""]), "negative"),
        (_request(("x", "INT64", [2])), "0 values in contents.int64_contents"),
    ],
)
def test_malformed_tensors_are_invalid_argument_naming_the_problem(request_, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_inputs(request_)


def test_outputs_are_little_endian_raw_contents_in_output_order():
    response = oip.ModelInferResponse()
    add_output(response, "y", np.ones((1, 2), dtype=np.float32))
    add_output(response, "hn", np.zeros((1, 3), dtype=np.float32))
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [1, 2]),
        ("hn", "FP32", [1, 3]),
    ]
    assert response.raw_output_contents[0] == np.ones(2, dtype="<f4").tobytes()


def test_parameters_read_whichever_kind_was_sent():
    req = oip.ModelInferRequest()
    req.parameters["sequence_id"].uint64_param = 2**63 + 5
    req.parameters["sequence_start"].bool_param = True
    req.parameters["tag"].string_param = "a"
    assert parameters(req.parameters) == {"sequence_id": 2**63 + 5, "sequence_start": True, "tag": "a"}


def test_typed_contents_request_works_under_both_service_names(running_server, tiny_oracle):
    x = np.random.default_rng(5).integers(0, 256, size=(1, 7), dtype=np.int64)
    req = oip.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="x", datatype="INT64", shape=[1, 7])
    t.contents.int64_contents.extend(x.ravel().tolist())
    req.outputs.add(name="y")
    with running_server() as srv, grpc.insecure_channel(srv.address) as channel:
        triton_path = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        responses = [
            triton_path(req, timeout=30),
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30),
        ]
    expected = tiny_oracle.run(x)[0]
    for response in responses:
        assert [o.name for o in response.outputs] == ["y"]
        y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(response.outputs[0].shape)
        np.testing.assert_allclose(y, expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl binary not installed (dev extra)")
def test_reflection_serves_tritons_service_name_for_grpcurl(running_server):
    def grpcurl(*args: str) -> str:
        proc = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    with running_server() as srv:
        listed = grpcurl(srv.address, "list").split()
        assert "inference.GRPCInferenceService" in listed and "cellserve.oip.GRPCInferenceService" not in listed
        assert {"cellserve.v1.CellServe", "grpc.health.v1.Health"} <= set(listed)
        described = grpcurl(srv.address, "describe", "inference.GRPCInferenceService")
        assert "rpc ModelStreamInfer ( stream .cellserve.oip.ModelInferRequest )" in described
        # What a Triton user types: Triton's service name, resolved through reflection.
        live = json.loads(grpcurl(srv.address, "inference.GRPCInferenceService/ServerLive"))
        meta = json.loads(
            grpcurl("-d", '{"name": "tiny"}', srv.address, "inference.GRPCInferenceService/ModelMetadata")
        )
        # The native API is still described from the same (private) descriptor pool.
        native = grpcurl(srv.address, "describe", "cellserve.v1.CellServe")
        assert "rpc Stream ( stream .cellserve.v1.StreamRequest )" in native
    assert live == {"live": True}
    assert meta["name"] == "tiny" and [i["name"] for i in meta["inputs"]] == ["x"]


def test_tritons_unserved_rpcs_say_what_to_use_instead(running_server):
    from tritonclient.grpc import service_pb2 as triton

    from cellserve.server.oip.servicer import UNSERVED_RPCS

    served = {m.name for m in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    tritons = {m.name for m in triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert tritons - served == set(UNSERVED_RPCS), "every Triton RPC is either served or answered with advice"
    expect = {"ModelStatistics": "/metrics", "RepositoryModelLoad": "--model-dirs",
              "SystemSharedMemoryRegister": "in the request", "CudaSharedMemoryStatus": "in the request",
              "LogSettings": "--log-level", "TraceSetting": "latency histograms"}
    with running_server() as srv, grpc.insecure_channel(srv.address) as channel:
        for name in sorted(UNSERVED_RPCS):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(f"/inference.GRPCInferenceService/{name}")(b"", timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
            assert e.value.details() != "Method not found!" and expect.get(name, "") in e.value.details(), name
        counted = srv.registry.get_sample_value("cellserve_errors_total", {"code": "UNIMPLEMENTED"})
    assert counted == len(UNSERVED_RPCS)
