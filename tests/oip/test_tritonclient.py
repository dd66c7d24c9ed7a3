"""The unmodified tritonclient against a real cellserve server on port 0, checked against the oracle."""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

TOL = 1e-5
WAIT_S = 60


class StreamInbox:
    """Collects a tritonclient stream's callbacks (they run on the client's reader thread)."""

    def __init__(self, client: tc.InferenceServerClient) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.items.put((result, error)))

    def take(self, n: int) -> list[tuple[Any, Any]]:
        return [self.items.get(timeout=WAIT_S) for _ in range(n)]

    def take_error(self) -> str:
        result, error = self.items.get(timeout=WAIT_S)
        assert result is None and error is not None, "expected an error response"
        return error.message()


@pytest.fixture
def triton(running_server) -> Iterator[tuple[Any, tc.InferenceServerClient]]:
    with running_server() as srv:
        client = tc.InferenceServerClient(url=srv.address)
        try:
            yield srv, client
        finally:
            client.close()


def tokens_input(x: np.ndarray, name: str = "x") -> tc.InferInput:
    t = tc.InferInput(name, list(x.shape), "INT64")
    t.set_data_from_numpy(x)
    return t


def fp32_input(name: str, a: np.ndarray) -> tc.InferInput:
    t = tc.InferInput(name, list(a.shape), "FP32")
    t.set_data_from_numpy(a.astype(np.float32))
    return t


def sample(srv: Any, name: str, **labels: str) -> float:
    return srv.registry.get_sample_value(name, labels) or 0.0


def test_liveness_readiness_metadata_and_config(triton):
    _, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "cellserve" and "sequence" in meta["extensions"]

    model = client.get_model_metadata("tiny", as_json=True)
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in model["inputs"] + model["outputs"]}
    # Implicit state, as a Triton model declares it: h and c are not inputs/outputs (perf_analyzer
    # would send every listed input); the stateless extension's h0/c0/hn/cn are named in the parameters.
    assert shapes == {"x": ("INT64", [-1, -1]), "y": ("FP32", [-1, -1, 256])}

    config = client.get_model_config("tiny").config  # tritonclient's own ModelConfig message
    assert config.name == "tiny" and config.max_batch_size >= 1
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    seq = config.sequence_batching
    assert {c.name for c in seq.control_input} == {"START", "END", "READY", "CORRID"}
    assert [(s.input_name, s.output_name, list(s.dims)) for s in seq.state] == [
        ("h0", "hn", [2, 32]),
        ("c0", "cn", [2, 32]),
    ]
    assert seq.max_sequence_idle_microseconds > 0
    assert [(i.name, i.optional, list(i.dims)) for i in config.input] == [("x", False, [-1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [-1, 256])]
    assert config.parameters["explicit_state_inputs"].string_value == "h0,c0"
    assert config.parameters["explicit_state_outputs"].string_value == "hn,cn"
    index = client.get_model_repository_index(as_json=True)
    assert [(m["name"], m["state"]) for m in index["models"]] == [("tiny", "READY")]


def test_20_interleaved_sequences_on_one_stream_equal_the_oracle(triton, tiny_oracle):
    srv, client = triton
    rng = random.Random(9)
    np_rng = np.random.default_rng(9)
    # Half the ids are integers, half strings (both are Triton sequence ids).
    ids: list[int | str] = [1000 + i if i % 2 else f"user-{i}" for i in range(20)]
    seqs = {sid: np_rng.integers(0, 256, size=rng.randint(20, 60), dtype=np.int64) for sid in ids}
    plans: dict[int | str, list[np.ndarray]] = {}
    for sid, tokens in seqs.items():
        cuts = sorted(rng.sample(range(1, len(tokens)), 3))
        plans[sid] = np.split(tokens, cuts)  # 4 chunks of varying T
    # A random interleaving that keeps each sequence's own order.
    order = [sid for sid in ids for _ in plans[sid]]
    rng.shuffle(order)

    inbox = StreamInbox(client)
    sent = dict.fromkeys(ids, 0)
    for sid in order:
        k = sent[sid]
        sent[sid] += 1
        chunk = plans[sid][k]
        client.async_stream_infer(
            "tiny",
            [tokens_input(chunk[None, :])],
            request_id=f"{sid}#{k}",
            sequence_id=sid,
            sequence_start=k == 0,
            sequence_end=k == len(plans[sid]) - 1,
        )
    got: dict[str, np.ndarray] = {}
    for result, error in inbox.take(len(order)):
        assert error is None, error.message()
        got[result.get_response().id] = result.as_numpy("y")
    client.stop_stream()

    for sid, tokens in seqs.items():
        y = np.concatenate([got[f"{sid}#{k}"][0] for k in range(len(plans[sid]))])  # [T, V]
        expected, _, _ = tiny_oracle.run(tokens[None, :])
        np.testing.assert_allclose(y, expected[0], atol=TOL, rtol=0)
    # They were cellserve sessions, counted like any other; `sequence_end` closed every one.
    assert sample(srv, "cellserve_sessions_opened_total", model="tiny") == 20
    assert sample(srv, "cellserve_sessions_closed_total", model="tiny", reason="client") == 20
    assert sample(srv, "cellserve_sessions_active", model="tiny") == 0
    assert sample(srv, "cellserve_steps_total", model="tiny") >= sum(len(t) for t in seqs.values())


def test_stateless_infer_round_trips_state_and_equals_the_oracle(triton, tiny_oracle):
    _, client = triton
    x = np.random.default_rng(4).integers(0, 256, size=(3, 24), dtype=np.int64)  # [B, T]
    first = client.infer("tiny", [tokens_input(x[:, :10])])
    h, c = first.as_numpy("hn"), first.as_numpy("cn")  # [B, L, H]
    assert h.shape == (3, 2, 32) and c.shape == (3, 2, 32)
    second = client.infer(
        "tiny",
        [tokens_input(x[:, 10:]), fp32_input("h0", h), fp32_input("c0", c)],
        outputs=[tc.InferRequestedOutput("y"), tc.InferRequestedOutput("hn"), tc.InferRequestedOutput("cn")],
    )
    y = np.concatenate([first.as_numpy("y"), second.as_numpy("y")], axis=1)  # [B, T, V]
    y_ref, h_ref, c_ref = tiny_oracle.run(x)  # h_ref [L, B, H]
    np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(second.as_numpy("hn"), h_ref.transpose(1, 0, 2), atol=TOL, rtol=0)
    np.testing.assert_allclose(second.as_numpy("cn"), c_ref.transpose(1, 0, 2), atol=TOL, rtol=0)

    # The same request on a stream without a sequence_id is stateless too.
    inbox = StreamInbox(client)
    client.async_stream_infer("tiny", [tokens_input(x[:, :10])], request_id="s")
    [(result, error)] = inbox.take(1)
    assert error is None, error.message()
    np.testing.assert_allclose(result.as_numpy("hn"), h, atol=0, rtol=0)
    client.stop_stream()


def _status(excinfo: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return excinfo.value.status()


def test_unknown_model_and_bad_inputs_are_triton_style_errors(triton):
    srv, client = triton
    x = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [tokens_input(x)])
    assert _status(e) == "StatusCode.NOT_FOUND" and "unknown model: 'nope'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert _status(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("tiny", model_version="7")
    assert _status(e) == "StatusCode.NOT_FOUND" and "version 7" in e.value.message()

    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [tokens_input(np.zeros(4, dtype=np.int64))])  # [T] without the batch dimension
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'x'" in e.value.message() and "[-1, -1]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [fp32_input("x", x)])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "data-type is 'FP32'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [tokens_input(x), fp32_input("h0", np.zeros((1, 2, 31)))])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "'h0'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [tokens_input(np.full((1, 2), 256, dtype=np.int64))])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "out of range" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [tokens_input(x)], sequence_id=5, sequence_start=True)
    assert _status(e) == "StatusCode.UNIMPLEMENTED" and "ModelStreamInfer" in e.value.message()
    assert sample(srv, "cellserve_errors_total", code="INVALID_ARGUMENT") >= 4


def test_sequence_rules_are_reported_in_the_stream_and_the_stream_goes_on(triton, tiny_oracle):
    srv, client = triton
    tokens = np.random.default_rng(2).integers(0, 256, size=(1, 12), dtype=np.int64)
    inbox = StreamInbox(client)

    client.async_stream_infer("tiny", [tokens_input(tokens[:, :4])], sequence_id=7)  # no start
    assert "must specify the START flag" in inbox.take_error()
    client.async_stream_infer("tiny", [tokens_input(tokens[:, :4])], sequence_id=7, sequence_start=True)
    [(first, error)] = inbox.take(1)
    assert error is None, error.message()
    client.async_stream_infer("tiny", [tokens_input(tokens[:, :4])], sequence_id=7, sequence_start=True)
    assert "already active" in inbox.take_error()
    client.async_stream_infer("tiny", [tokens_input(np.zeros(3, dtype=np.int64))], sequence_id=7)
    assert "unexpected shape" in inbox.take_error()
    # A batch of 2 is fine stateless, but a sequence request carries one sequence.
    client.async_stream_infer("tiny", [tokens_input(np.zeros((2, 3), dtype=np.int64))], sequence_id=7)
    assert "unexpected shape" in inbox.take_error()
    # Failed requests left the state alone: the rest of the sequence still matches the oracle.
    client.async_stream_infer(
        "tiny", [tokens_input(tokens[:, 4:])], sequence_id=7, sequence_end=True, outputs=[tc.InferRequestedOutput("y")]
    )
    [(rest, error)] = inbox.take(1)
    assert error is None, error.message()
    y = np.concatenate([first.as_numpy("y"), rest.as_numpy("y")], axis=1)
    np.testing.assert_allclose(y, tiny_oracle.run(tokens)[0], atol=TOL, rtol=0)
    client.async_stream_infer("tiny", [tokens_input(tokens[:, :4])], sequence_id=7)  # ended: state freed
    assert "must specify the START flag" in inbox.take_error()
    client.stop_stream()
    assert sample(srv, "cellserve_sessions_active", model="tiny") == 0


def test_sequence_ids_are_scoped_to_their_stream(triton):
    srv, client = triton
    other = tc.InferenceServerClient(url=srv.address)
    try:
        x = np.ones((1, 3), dtype=np.int64)
        mine = StreamInbox(client)
        client.async_stream_infer("tiny", [tokens_input(x)], sequence_id=11, sequence_start=True)
        assert mine.take(1)[0][1] is None
        theirs = StreamInbox(other)
        other.async_stream_infer("tiny", [tokens_input(x)], sequence_id=11)  # someone else's id: no state for it
        assert "scoped to the stream" in theirs.take_error()
        other.async_stream_infer("tiny", [tokens_input(x)], sequence_id=11, sequence_start=True)  # its own 11
        assert theirs.take(1)[0][1] is None
        assert sample(srv, "cellserve_sessions_active", model="tiny") == 2
        other.stop_stream()  # returns once the server ended the stream, which closes its sequence
        assert sample(srv, "cellserve_sessions_active", model="tiny") == 1
        client.stop_stream()
        assert sample(srv, "cellserve_sessions_active", model="tiny") == 0
        assert sample(srv, "cellserve_sessions_closed_total", model="tiny", reason="disconnect") == 2
    finally:
        other.close()


def test_idle_sequence_is_ended_by_the_server_with_an_error_message(triton):
    srv, client = triton
    inbox = StreamInbox(client)
    x = np.ones((1, 2), dtype=np.int64)
    client.async_stream_infer("tiny", [tokens_input(x)], sequence_id="idle", sequence_start=True)
    assert inbox.take(1)[0][1] is None

    async def expire() -> int:  # as if its idle timeout had passed
        return srv.server.sessions.expire_idle(time.monotonic() + 1e6)

    assert srv.call(expire()) == 1
    message = inbox.take_error()
    assert "sequence 'idle' was ended by the server" in message and "idle" in message
    client.async_stream_infer("tiny", [tokens_input(x)], sequence_id="idle")
    assert "must specify the START flag" in inbox.take_error()
    client.stop_stream()
    assert sample(srv, "cellserve_sessions_closed_total", model="tiny", reason="idle") == 1


def test_bearer_tokens_apply_to_oip_but_liveness_and_readiness_stay_open(running_server, tiny_oracle):
    with running_server(auth_tokens="oip-token") as srv:
        client = tc.InferenceServerClient(url=srv.address)
        try:
            assert client.is_server_live() and client.is_server_ready()  # probes need no token
            with pytest.raises(InferenceServerException) as err:
                client.get_model_metadata("tiny")
            assert "UNAUTHENTICATED" in str(err.value.status())
            headers = {"authorization": "Bearer oip-token"}
            assert client.is_model_ready("tiny", headers=headers)
            x = np.arange(5, dtype=np.int64)[None]
            result = client.infer("tiny", [tokens_input(x)], headers=headers)
            h, c = tiny_oracle.init_state(1)
            np.testing.assert_allclose(result.as_numpy("y"), tiny_oracle.run(x, h, c)[0], atol=TOL, rtol=0)
        finally:
            client.close()
