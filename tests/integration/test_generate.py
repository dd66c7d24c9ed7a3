"""Server-side Generate: reproducible with a seed, identical to offline `cellserve generate`."""

from __future__ import annotations

import grpc
import pytest

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc


def generate(address: str, **kw: object) -> tuple[bytes, int]:
    """Returns (all bytes, number of messages)."""
    with grpc.insecure_channel(address) as ch:
        responses = list(pb_grpc.CellServeStub(ch).Generate(pb.GenerateRequest(**kw), timeout=60))
    return b"".join(r.text for r in responses), len(responses)


@pytest.mark.parametrize(("temperature", "top_k"), [(0.8, 0), (1.0, 5), (0.0, 0)])
def test_generate_with_a_seed_is_reproducible_and_equals_offline(running_server, tiny_model_dir, temperature, top_k):
    from cellserve.model.generate import generate_text

    kw = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 40, "temperature": temperature, "top_k": top_k}
    with running_server() as srv:
        first, messages = generate(srv.address, seed=11, **kw)
        again, _ = generate(srv.address, seed=11, **kw)
    offline = generate_text(tiny_model_dir, "def f(x):", max_bytes=40, temperature=temperature, top_k=top_k, seed=11)
    assert first == again == offline
    assert len(first) == 40 and messages == 40  # streamed token by token


def test_generate_with_different_seeds_differs(running_server):
    kw = {"model": "tiny", "prompt": "import os\n", "max_tokens": 40, "temperature": 1.0}
    with running_server() as srv:
        a, _ = generate(srv.address, seed=1, **kw)
        b, _ = generate(srv.address, seed=2, **kw)
        assert srv.server.sessions.sessions == {}  # internal sessions are closed again
    assert a != b


@pytest.mark.parametrize(
    ("request_kw", "code", "words"),
    [
        ({"model": "nope", "prompt": "x", "max_tokens": 1}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"model": "tiny", "prompt": "", "max_tokens": 1}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 99999}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 1, "temperature": -1}, grpc.StatusCode.INVALID_ARGUMENT,
         "temperature"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 1, "temperature": float("nan")},
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 1, "top_k": 300}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ],
    ids=["unknown-model", "empty-prompt", "zero-tokens", "too-many-tokens", "negative-temp", "nan-temp", "top-k"],
)
def test_bad_generate_requests_get_precise_status(running_server, request_kw, code, words):
    with running_server() as srv, pytest.raises(grpc.RpcError) as e:
        generate(srv.address, **request_kw)
    assert e.value.code() == code
    assert words in e.value.details()


def test_generate_on_a_feature_model_is_failed_precondition(running_server, tmp_path):
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path, name="feat", input_kind="features", input_size=4, output_size=3, layers=1, hidden=8)
    with running_server(model_dirs=[tmp_path]) as srv, pytest.raises(grpc.RpcError) as e:
        generate(srv.address, model="feat", prompt="x", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
