"""Hostile tensor shapes on both APIs: each is answered INVALID_ARGUMENT, nothing is logged, sessions go on.

Shapes whose element count overflows int64, ranks past ``MAX_RANK`` (and past numpy's 64), negative and
zero dimensions, and byte lengths that do not match the shape. The native Stream answers each in-stream and
its session then steps on from an unchanged state (checked against the numpy oracle); OIP ModelInfer
answers with the status, ModelStreamInfer with an error response, and its next sequence still runs.
One real server on port 0 serves the whole module; hypothesis draws the shapes.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import ServerHandle, serve_in_thread

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import MAX_ELEMENTS, MAX_RANK, to_proto

INT64 = (-(2**63), 2**63 - 1)
MAX_CHUNK = 16
TOL = 1e-5


@dataclass(frozen=True)
class Hostile:
    """A declared shape and the bytes sent with it (``contents``: as OIP typed values instead of raw)."""

    shape: list[int]
    raw: bytes
    contents: bool = False


def _with(dims: list[int], extra: int, at: int) -> list[int]:
    return [*dims[:at], extra, *dims[at:]]


small_dims = st.lists(st.integers(0, 8), max_size=3)
huge = st.integers(MAX_ELEMENTS + 1, INT64[1])
junk = st.binary(max_size=64)
# Every kind is invalid for a token model on both APIs ([T] natively; [B, T] on OIP, 1 <= B, T).
hostile = st.one_of(
    # more dimensions than MAX_RANK, and than numpy's 64
    st.builds(
        Hostile,
        st.integers(MAX_RANK + 1, 80).flatmap(lambda n: st.lists(st.integers(0, 2), min_size=n, max_size=n)),
        junk,
    ),
    # element counts that overflow int64 ([2**32, 2**32], [2**62, 4], ...), zero dimensions beside them too
    st.builds(Hostile, st.builds(_with, st.lists(st.integers(0, 2**40), max_size=3), huge, st.integers(0, 3)), junk),
    st.sampled_from(
        [
            Hostile([2**32, 2**32], b""),
            Hostile([2**62, 4], b"\0" * 8),
            Hostile([0, 2**62], b""),
            Hostile([1] * 65, b"\0" * 8),
        ]
    ),  # the probe's cases (issue 30)
    # a negative dimension (the proto's int64 allows it), alone or beside others
    st.builds(Hostile, st.builds(_with, small_dims, st.integers(INT64[0], -1), st.integers(0, 3)), junk),
    # zero dimensions: an empty step, an empty batch, zero steps
    st.builds(Hostile, st.sampled_from([[0], [0, 3], [1, 0], [0, 0], [3, 0, 2]]), st.just(b"")),
    # a plausible shape with the wrong number of bytes, or of typed values
    st.builds(
        lambda t, two, n, contents: Hostile([1, t] if two else [t], b"\0" * n, contents),
        st.integers(1, 8),
        st.booleans(),
        st.integers(0, 80),
        st.booleans(),
    ).filter(lambda h: len(h.raw) != 8 * h.shape[-1]),
)


class LogTrap(logging.Handler):
    """Collects every record at ERROR or above, or carrying a traceback, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@dataclass
class Served:
    srv: ServerHandle
    channel: grpc.Channel
    trap: LogTrap

    def errors(self, code: str) -> float:
        return self.srv.registry.get_sample_value("cellserve_errors_total", {"code": code}) or 0.0


@pytest.fixture(scope="module")
def served(tiny_model_dir: Any) -> Iterator[Served]:
    from cellserve.server.settings import Settings

    trap = LogTrap()
    root = logging.getLogger()
    root.addHandler(trap)
    config = Settings(model_dirs=[tiny_model_dir], host="127.0.0.1", port=0, metrics_port=0,
                      capacity=32, max_chunk_steps=MAX_CHUNK)  # fmt: skip
    try:
        with serve_in_thread(config) as srv, grpc.insecure_channel(srv.address) as channel:
            yield Served(srv, channel, trap)
    finally:
        root.removeHandler(trap)


@pytest.fixture(autouse=True)
def _nothing_logged(served: Served) -> Iterator[None]:
    """No test here may make the server log an error or a traceback, nor answer INTERNAL."""
    served.trap.records.clear()
    internal = served.errors("INTERNAL")
    yield
    assert not served.trap.records, [r.getMessage() for r in served.trap.records]
    assert served.errors("INTERNAL") == internal


def _native_tensor(h: Hostile) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_INT64, shape=h.shape, raw=h.raw)


def _oip_request(h: Hostile, **kw: Any) -> oip.ModelInferRequest:
    req = oip.ModelInferRequest(model_name="tiny", **kw)
    t = req.inputs.add(name="x", datatype="INT64", shape=h.shape)
    if h.contents:
        t.contents.int64_contents.extend([0] * (h.shape[-1] + 1 + len(h.raw) % 3))  # never the count asked for
    else:
        req.raw_input_contents.append(h.raw)
    return req


def _good_tokens(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=int(rng.integers(1, MAX_CHUNK + 1)), dtype=np.int64)  # [T]


class NativeSession:
    """One native Stream, driven request by request with the blocking client."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._call = pb_grpc.CellServeStub(channel).Stream(iter(self._requests.get, None), timeout=60)
        assert self.send(pb.StreamRequest(open=pb.Open(model="tiny"))).WhichOneof("kind") == "opened"

    def send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        self._requests.put(request)
        return next(self._call)

    def end(self) -> grpc.StatusCode:
        closed = self.send(pb.StreamRequest(close=pb.Close()))
        assert closed.WhichOneof("kind") == "closed", closed
        self._requests.put(None)
        for _ in self._call:
            pass
        return self._call.code()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(hostile, min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_native_stream_answers_each_hostile_shape_in_stream_and_the_session_goes_on(
    served: Served, tiny_oracle: Any, bad: list[Hostile], seed: int
) -> None:
    session = NativeSession(served.channel)
    for seq, h in enumerate(bad, start=1):
        answer = session.send(pb.StreamRequest(step=pb.Step(seq=seq, input=_native_tensor(h))))
        assert answer.WhichOneof("kind") == "error", answer
        assert (answer.error.seq, answer.error.code) == (seq, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert len(answer.error.message) < 400, answer.error.message  # says what was wrong, briefly
    tokens = _good_tokens(seed)
    answer = session.send(pb.StreamRequest(step=pb.Step(seq=99, input=to_proto(tokens))))
    assert answer.WhichOneof("kind") == "output" and answer.output.seq == 99, answer
    y = np.frombuffer(answer.output.output.raw, "<f4").reshape(answer.output.output.shape)  # [T, O]
    h0, c0 = tiny_oracle.init_state(1)
    np.testing.assert_allclose(y, tiny_oracle.run(tokens[None], h0, c0)[0][0], atol=TOL, rtol=0)  # state unchanged
    assert session.end() == grpc.StatusCode.OK


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=hostile)
def test_model_infer_answers_each_hostile_shape_invalid_argument(served: Served, h: Hostile) -> None:
    with pytest.raises(grpc.RpcError) as e:
        oip_grpc.GRPCInferenceServiceStub(served.channel).ModelInfer(_oip_request(h), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "input 'x'" in e.value.details()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(hostile, min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_model_stream_infer_answers_each_hostile_shape_with_an_error_and_goes_on(
    served: Served, tiny_oracle: Any, bad: list[Hostile], seed: int
) -> None:
    requests: queue.Queue[oip.ModelInferRequest | None] = queue.Queue()
    call = oip_grpc.GRPCInferenceServiceStub(served.channel).ModelStreamInfer(iter(requests.get, None), timeout=60)
    invalid = served.errors("INVALID_ARGUMENT")
    for i, h in enumerate(bad):
        sequence = {"sequence_id": oip.InferParameter(int64_param=1000 + i),
                    "sequence_start": oip.InferParameter(bool_param=True)}  # fmt: skip
        requests.put(_oip_request(h, id=f"bad-{i}", parameters=sequence))
        answer = next(call)
        assert answer.error_message and answer.infer_response.id == f"bad-{i}", answer
        assert "input 'x'" in answer.error_message
    assert served.errors("INVALID_ARGUMENT") == invalid + len(bad)
    tokens = _good_tokens(seed)
    good = oip.ModelInferRequest(model_name="tiny", id="good")
    good.inputs.add(name="x", datatype="INT64", shape=[1, len(tokens)])
    good.raw_input_contents.append(tokens.astype("<i8").tobytes())
    good.parameters["sequence_id"].int64_param = 7
    good.parameters["sequence_start"].bool_param = True
    good.parameters["sequence_end"].bool_param = True
    requests.put(good)
    answer = next(call)
    assert not answer.error_message, answer.error_message
    out = answer.infer_response
    y = np.frombuffer(out.raw_output_contents[0], "<f4").reshape(out.outputs[0].shape)  # [1, T, O]
    h0, c0 = tiny_oracle.init_state(1)
    np.testing.assert_allclose(y, tiny_oracle.run(tokens[None], h0, c0)[0], atol=TOL, rtol=0)
    requests.put(None)
    assert list(call) == [] and call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize(
    "shape",
    [[2**32, 2**32], [2**62, 4], [1] * 65, [0, 2**62]],
    ids=["2^32x2^32", "2^62x4", "rank65", "0x2^62"],
)
def test_the_probes_impossible_shapes_are_invalid_argument_on_every_path(served: Served, shape: list[int]) -> None:
    """The shapes of the probe that found INTERNAL (issue 30), with a byte length of one int64."""
    h = Hostile(shape, b"\0" * 8)
    session = NativeSession(served.channel)
    answer = session.send(pb.StreamRequest(step=pb.Step(seq=1, input=_native_tensor(h))))
    assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answer
    assert session.end() == grpc.StatusCode.OK
    for req in (_oip_request(h), _oip_request(Hostile(shape, b""))):
        with pytest.raises(grpc.RpcError) as e:
            oip_grpc.GRPCInferenceServiceStub(served.channel).ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
