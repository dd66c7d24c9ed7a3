"""An imported user model is served like a trained one: SDK sessions in random chunks, resume tokens, drain,
metrics, ModelInfo, and tritonclient sequences — all checked against a whole-sequence onnxruntime run of the
user's own file (the graph's names ``inp``, ``h_in``, ``c_in`` → ``out``, ``h_out``, ``c_out`` throughout)."""

from __future__ import annotations

import asyncio
import json
import queue
import random
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import user_models as um

from cellserve.client import Client
from cellserve.model.manifest import sha256_file
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

TOL = 1e-5
KEYS = '{"active": "k1", "keys": {"k1": "' + "3c" * 32 + '"}}'


class WholeRun:
    """The user's file run by onnxruntime on whole sequences from zero state: what every served run must equal."""

    def __init__(self, onnx_path: Path) -> None:
        self.sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [T, I] → y [T, O], h [L, H], c [L, H]."""
        zeros = np.zeros((um.LAYERS, 1, um.HIDDEN), np.float32)
        y, h, c = self.sess.run(["out", "h_out", "c_out"], {"inp": x[None], "h_in": zeros, "c_in": zeros})
        return y[0], h[:, 0], c[:, 0]


@pytest.fixture(scope="module")
def whole(sensor_onnx: Path) -> WholeRun:
    return WholeRun(sensor_onnx)


def sequences(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(20, 60)), um.FEATURES)).astype(np.float32) for _ in range(n)]


def random_chunks(rng: random.Random, x: np.ndarray, pieces: int = 5) -> list[np.ndarray]:
    return np.split(x, sorted(rng.sample(range(1, len(x)), pieces - 1)))


def sample(srv: Any, name: str, **labels: str) -> float:
    return srv.registry.get_sample_value(name, labels) or 0.0


def test_sdk_sessions_in_random_chunks_equal_a_whole_onnxruntime_run(sensor_model_dir, whole, running_server):
    rng = random.Random(16)
    seqs = sequences(16, 4)
    plans = [random_chunks(rng, x) for x in seqs]
    order = [i for i, plan in enumerate(plans) for _ in plan]
    rng.shuffle(order)  # sessions interleaved, each in its own order
    outputs: list[list[np.ndarray]] = [[] for _ in seqs]
    with running_server(model_dirs=[sensor_model_dir]) as srv, Client(srv.address) as client, ExitStack() as stack:
        info = client.model_info("sensor")
        assert (info.input_kind, info.input_size, info.output_size, info.layers, info.hidden) == (
            "features", 5, 3, 2, 16,
        )  # fmt: skip
        assert [t.name for t in info.inputs] == ["inp", "h_in", "c_in"]
        sessions = [stack.enter_context(client.session("sensor")) for _ in seqs]
        for i in order:
            outputs[i].append(sessions[i].step(plans[i][len(outputs[i])]))
        for s, x in zip(sessions, seqs, strict=True):
            assert s.steps == len(x)
        stack.close()
        assert sample(srv, "cellserve_steps_total", model="sensor") == sum(len(x) for x in seqs)
        assert sample(srv, "cellserve_sessions_opened_total", model="sensor") == len(seqs)
        assert sample(srv, "cellserve_sessions_closed_total", model="sensor", reason="client") == len(seqs)
        assert sample(srv, "cellserve_state_pool_bytes", model="sensor") > 0

        # ModelInfo serves the manifest as written: the imported provenance travels with the model.
        with grpc.insecure_channel(srv.address) as channel:
            reply = pb_grpc.CellServeStub(channel).ModelInfo(pb.ModelInfoRequest(model="sensor"), timeout=10)
    manifest = json.loads(reply.manifest_json)
    assert manifest["provenance"]["kind"] == "imported"
    assert manifest["provenance"]["source_sha256"] == manifest["sha256"] == sha256_file(sensor_model_dir / "model.onnx")
    for got, x in zip(outputs, seqs, strict=True):
        np.testing.assert_allclose(np.concatenate(got), whole(x)[0], atol=TOL, rtol=0)


def test_an_imported_session_moves_on_drain_and_resumes_from_a_token(sensor_model_dir, whole, running_server):
    (x,) = sequences(7, 1)
    with (
        running_server(model_dirs=[sensor_model_dir], token_keys=KEYS) as a,
        running_server(model_dirs=[sensor_model_dir], token_keys=KEYS) as b,
    ):
        with Client([a.address, b.address]) as client, client.session("sensor") as s:
            ys = [s.step(x[:7])]
            token = s.snapshot()  # the state after 7 steps
            first = s.session_id
            drained = asyncio.run_coroutine_threadsafe(a.server.drain(30), a.loop)
            ys.append(s.step(x[7:12]))  # answered by A; then the SDK moves the session to B
            ys.append(s.step(x[12:]))  # answered by B
            assert s.session_id != first and s.steps == len(x)
            drained.result(30)
            assert b.server.sessions.sessions and not a.server.sessions.sessions
        with Client(b.address) as client, client.session("sensor", resume_token=token) as r:
            assert r.steps == 7
            resumed = r.step(x[7:])
    want = whole(x)[0]
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(resumed, want[7:], atol=TOL, rtol=0)


def fp32(name: str, a: np.ndarray) -> tc.InferInput:
    t = tc.InferInput(name, list(a.shape), "FP32")
    t.set_data_from_numpy(a.astype(np.float32))
    return t


def test_tritonclient_steps_imported_sequences_by_the_graph_names(sensor_model_dir, sensor_onnx, whole,
                                                                  running_server):  # fmt: skip
    rng = random.Random(5)
    seqs = dict(enumerate(sequences(5, 3), start=100))
    plans = {sid: random_chunks(rng, x, 4) for sid, x in seqs.items()}
    order = [sid for sid, plan in plans.items() for _ in plan]
    rng.shuffle(order)
    with running_server(model_dirs=[sensor_model_dir]) as srv:
        client = tc.InferenceServerClient(url=srv.address)
        try:
            meta = client.get_model_metadata("sensor", as_json=True)
            shapes = {t["name"]: [int(d) for d in t["shape"]] for t in meta["inputs"] + meta["outputs"]}
            assert shapes == {"inp": [-1, -1, 5], "out": [-1, -1, 3]}  # h/c are implicit state, by graph name:
            config = client.get_model_config("sensor").config
            assert [(s.input_name, s.output_name, list(s.dims)) for s in config.sequence_batching.state] == [
                ("h_in", "h_out", [2, 16]), ("c_in", "c_out", [2, 16])]  # fmt: skip
            assert config.parameters["explicit_state_inputs"].string_value == "h_in,c_in"
            assert config.parameters["explicit_state_outputs"].string_value == "h_out,c_out"

            inbox: queue.Queue[tuple[Any, Any]] = queue.Queue()
            client.start_stream(callback=lambda result, error: inbox.put((result, error)))
            sent = dict.fromkeys(seqs, 0)
            for sid in order:
                k = sent[sid]
                sent[sid] += 1
                client.async_stream_infer("sensor", [fp32("inp", plans[sid][k][None])], request_id=f"{sid}#{k}",
                                          sequence_id=sid, sequence_start=k == 0,
                                          sequence_end=k == len(plans[sid]) - 1)  # fmt: skip
            got: dict[str, np.ndarray] = {}
            for _ in order:
                result, error = inbox.get(timeout=60)
                assert error is None, error.message()
                got[result.get_response().id] = result.as_numpy("out")[0]
            client.stop_stream()

            # Stateless inference with caller-held state: OIP's batch-first [B, L, H] in, h_out/c_out out.
            xb = np.stack([seqs[100][:12], seqs[101][:12]])  # [B=2, T, I]
            h = np.random.default_rng(1).standard_normal((2, um.LAYERS, um.HIDDEN)).astype(np.float32)
            res = client.infer("sensor", [fp32("inp", xb), fp32("h_in", h), fp32("c_in", -h)])
        finally:
            client.close()
        assert sample(srv, "cellserve_sessions_closed_total", model="sensor", reason="client") == len(seqs)
    for sid, x in seqs.items():
        y = np.concatenate([got[f"{sid}#{k}"] for k in range(len(plans[sid]))])
        np.testing.assert_allclose(y, whole(x)[0], atol=TOL, rtol=0)
    ref = ort.InferenceSession(str(sensor_onnx), providers=["CPUExecutionProvider"])
    feeds = {"inp": xb, "h_in": h.transpose(1, 0, 2).copy(), "c_in": -h.transpose(1, 0, 2)}
    y_ref, h_ref, c_ref = ref.run(["out", "h_out", "c_out"], feeds)
    np.testing.assert_allclose(res.as_numpy("out"), y_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(res.as_numpy("h_out"), h_ref.transpose(1, 0, 2), atol=TOL, rtol=0)
    np.testing.assert_allclose(res.as_numpy("c_out"), c_ref.transpose(1, 0, 2), atol=TOL, rtol=0)
