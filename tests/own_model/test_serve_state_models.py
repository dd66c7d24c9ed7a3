"""Every stateful class of issue 25, imported with ``import_onnx``, served, streamed, and checked against a
batch-1 onnxruntime run of the same file with the state carried by hand (the oracle for foreign models).

One server serves all seven models at once, so sessions interleave across models as well as within one.
Covered: SDK sessions (asyncio and sync) stepping random chunks; a SIGKILL of the server mid-run, resumed
on a second one; OIP sequences and stateless inference through the unmodified ``tritonclient``; the
models' Triton config; bad steps answered in-stream.
"""

from __future__ import annotations

import asyncio
import queue
import random
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from state_model_oracle import KEYS, WAIT_S, Plan, tolerance
from state_models import MODELS
from stream_helpers import open_msg, read_rest, step_msg

from cellserve.client import AsyncClient, Client
from cellserve.model.importer import import_onnx
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

# -- SDK sessions ------------------------------------------------------------------------------------------


def test_asyncio_sdk_sessions_of_every_class_interleaved_equal_the_batch_1_oracle(server, oracles):
    rng = np.random.default_rng(25)
    plans = [Plan(name, rng) for name in MODELS for _ in range(3)]
    random.Random(25).shuffle(plans)

    async def one(client: AsyncClient, plan: Plan) -> None:
        async with client.session(plan.name) as s:
            for chunk in plan.chunks:
                plan.outputs.append(await s.step(chunk))
                await asyncio.sleep(0)  # let the other sessions in: their steps share batches

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in plans)), WAIT_S)

    asyncio.run(main())
    for plan in plans:
        plan.check(oracles[plan.name])


def test_sync_sdk_sessions_of_every_class_from_threads_equal_the_batch_1_oracle(server, oracles):
    rng = np.random.default_rng(52)
    plans = [Plan(name, rng) for name in MODELS for _ in range(2)]

    def one(client: Client, plan: Plan) -> None:
        try:
            with client.session(plan.name) as s:
                for chunk in plan.chunks:
                    plan.outputs.append(s.step(chunk))
        except BaseException as e:  # reported by plan.check
            plan.error = e

    with Client(server.address) as client:
        threads = [threading.Thread(target=one, args=(client, p)) for p in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    for plan in plans:
        plan.check(oracles[plan.name])


def test_snapshot_tokens_carry_every_state_tensor_and_resume_exactly(server, oracles):
    rng = np.random.default_rng(7)
    with Client(server.address) as client:
        for name in MODELS:
            plan = Plan(name, rng)
            with client.session(name) as s:
                for chunk in plan.chunks[:3]:
                    plan.outputs.append(s.step(chunk))
                token = s.snapshot()
            with client.session(name, resume_token=token) as s:  # a new session from the token's state
                for chunk in plan.chunks[3:]:
                    plan.outputs.append(s.step(chunk))
            plan.check(oracles[name])


# -- a server lost mid-run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "drain"])
def test_a_killed_or_drained_server_s_sessions_of_every_class_finish_on_another_equal_to_the_oracle(
    model_dirs, oracles, tmp_path, sig
):
    from server_helpers import start_server_process

    dirs = list(model_dirs.values())
    more = [arg for d in dirs[1:] for arg in ("--model-dirs", str(d))]
    a = start_server_process(dirs[0], tmp_path, *more, "--token-keys", KEYS, "--grace-s", "30")
    b = start_server_process(dirs[0], tmp_path, *more, "--token-keys", KEYS)
    rng = np.random.default_rng(99)
    plans = [Plan(name, rng, chunks=10) for name in MODELS for _ in range(3)]
    aio_plans, sync_plans = plans[0::3] + plans[1::3], plans[2::3]  # two asyncio sessions, one sync, per class
    under_way, killed = threading.Event(), threading.Event()
    started: list[Plan] = []
    lock = threading.Lock()

    def mid_run(plan: Plan) -> None:
        with lock:
            started.append(plan)
            if len(started) == len(plans):
                under_way.set()

    async def one(client: AsyncClient, plan: Plan) -> None:
        async with client.session(plan.name, checkpoint_every=2) as s:
            for k, chunk in enumerate(plan.chunks):
                plan.outputs.append(await s.step(chunk))
                if k == 3:
                    mid_run(plan)  # every session is mid-run when A goes
                    await asyncio.get_running_loop().run_in_executor(None, killed.wait, WAIT_S)

    def one_sync(client: Client, plan: Plan) -> None:
        try:
            with client.session(plan.name, checkpoint_every=2) as s:
                for k, chunk in enumerate(plan.chunks):
                    plan.outputs.append(s.step(chunk))
                    if k == 3:
                        mid_run(plan)
                        killed.wait(WAIT_S)
        except BaseException as e:  # reported by plan.check
            plan.error = e

    async def aio_sessions() -> None:
        async with AsyncClient([a.address, b.address]) as client:
            await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in aio_plans)), WAIT_S)

    try:
        with Client([a.address, b.address]) as client:
            threads = [threading.Thread(target=one_sync, args=(client, p)) for p in sync_plans]
            threads.append(threading.Thread(target=asyncio.run, args=(aio_sessions(),)))
            for t in threads:
                t.start()
            assert under_way.wait(WAIT_S), f"only {len(started)} of {len(plans)} sessions got under way"
            a.proc.send_signal(sig)  # the sessions go on at once: a drained server leaves when they have moved
            killed.set()
            for t in threads:
                t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads), "sessions still running"
        assert a.proc.wait(30) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    finally:
        killed.set()
        for proc in (a.proc, b.proc):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    for plan in plans:
        assert len(plan.outputs) == len(plan.chunks), plan.name
        plan.check(oracles[plan.name])


# -- OIP / Triton ------------------------------------------------------------------------------------------


@pytest.fixture
def triton(server: Any) -> Iterator[tc.InferenceServerClient]:
    client = tc.InferenceServerClient(url=server.address)
    try:
        yield client
    finally:
        client.close()


def _x_input(name: str, a: np.ndarray) -> tc.InferInput:
    t = tc.InferInput(name, list(a.shape), {"float32": "FP32", "float16": "FP16", "int64": "INT64"}[a.dtype.name])
    t.set_data_from_numpy(a)
    return t


def test_the_triton_config_lists_every_state_pair_as_implicit_state(triton, model_dirs):
    for name, spec in MODELS.items():
        config = triton.get_model_config(name).config
        states = [(s.input_name, s.output_name, list(s.dims)) for s in config.sequence_batching.state]
        want = [(i, o, [d for d in shape if d != "B"]) for i, o, _, shape in spec.states]
        assert states == want, name
        assert [t.name for t in config.input] == [spec.x] and [t.name for t in config.output] == [spec.y]
        assert config.max_batch_size == (1 if spec.fixed_batch == 1 else config.max_batch_size)


def test_oip_sequences_of_every_class_on_one_stream_equal_the_batch_1_oracle(triton, oracles):
    rng = np.random.default_rng(3)
    plans = {name: Plan(name, rng, chunks=4) for name in MODELS}
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: replies.put((result, error)))
    sent = 0
    for sid, (name, plan) in enumerate(plans.items(), start=1):
        time_axis = MODELS[name].time_axis
        requests = plan.chunks if time_axis else [frame[None] for chunk in plan.chunks for frame in chunk]
        for k, x in enumerate(requests):  # a per-frame model takes one frame [1, N] per request
            triton.async_stream_infer(
                name, [_x_input(MODELS[name].x, x[None] if time_axis else x)], request_id=f"{name}#{k}",
                sequence_id=sid, sequence_start=k == 0, sequence_end=k == len(requests) - 1,
            )  # fmt: skip
            sent += 1
    got: dict[str, np.ndarray] = {}
    for _ in range(sent):
        result, error = replies.get(timeout=WAIT_S)
        assert error is None, error.message()
        response = result.get_response()
        name = response.model_name
        got[response.id] = result.as_numpy(MODELS[name].y)
    triton.stop_stream()
    for name, plan in plans.items():
        keys = sorted((r for r in got if r.split("#")[0] == name), key=lambda r: int(r.split("#")[1]))
        ys = [got[k] for k in keys]
        y = np.concatenate([y[0] for y in ys]) if MODELS[name].time_axis else np.concatenate(ys)
        np.testing.assert_allclose(y, oracles[name].run(plan.chunks), atol=tolerance(name), rtol=0, err_msg=name)


def test_stateless_infer_takes_and_returns_every_state_tensor_batch_first(triton, oracles):
    rng = np.random.default_rng(11)
    for name in ("three_state", "lstm_stacked", "gru"):
        spec, oracle = MODELS[name], oracles[name]
        first, second = (rng.standard_normal((2, 3, *spec.frame)).astype(np.float32) for _ in range(2))
        out_names = [tc.InferRequestedOutput(spec.y), *(tc.InferRequestedOutput(o) for _, o, _, _ in spec.states)]
        a = triton.infer(name, [_x_input(spec.x, first)], outputs=out_names)
        states = [a.as_numpy(o) for _, o, _, _ in spec.states]  # [B, *state] each
        b = triton.infer(
            name,
            [_x_input(spec.x, second), *(_x_input(i, s) for (i, _, _, _), s in zip(spec.states, states, strict=True))],
            outputs=out_names,
        )
        for row in range(2):  # each row: one session of two chunks
            want = oracle.run([first[row], second[row]])
            np.testing.assert_allclose(b.as_numpy(spec.y)[row], want[3:], atol=1e-4, rtol=0, err_msg=name)


# -- bad steps ---------------------------------------------------------------------------------------------


def test_a_step_of_the_wrong_frame_or_dtype_is_answered_in_stream_naming_the_model_and_shape(server):
    async def main() -> list[tuple[str, str]]:
        out = []
        async with grpc.aio.insecure_channel(server.address) as ch:
            for name in ("per_frame", "three_state"):
                spec = MODELS[name]
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg(name))
                assert (await call.read()).WhichOneof("kind") == "opened"
                good = np.zeros((2, *(64 if d is None else d for d in spec.frame)), np.float32)
                for bad in (np.zeros((2, 3, 3), np.float32), good.astype(np.float64)):
                    await call.write(step_msg(1, bad))
                    reply = await call.read()
                    assert reply.WhichOneof("kind") == "error", reply
                    out.append((name, reply.error.message))
                await call.write(step_msg(2, good))  # the session goes on
                assert (await call.read()).WhichOneof("kind") == "output"
                await call.write(pb.StreamRequest(close=pb.Close()))
                await read_rest(call)
        return out

    for name, message in asyncio.run(asyncio.wait_for(main(), WAIT_S)):
        assert repr(name) in message and "[T, " in message, message


# -- generate, for any token model -------------------------------------------------------------------------


class ByteGRU(torch.nn.Module):
    """A byte-level GRU language model: ids [B, T] -> logits [B, T, 256]; one state h [1, B, 24]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(256, 12)
        self.gru = torch.nn.GRU(12, 24, batch_first=True)
        self.head = torch.nn.Linear(24, 256)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, hn = self.gru(self.embed(x), h0)
        return self.head(seq), hn


def test_a_gru_token_model_generates_the_same_bytes_offline_and_through_the_server(tmp_path, running_server):
    from cellserve.model.generate import Generator

    onnx_file = tmp_path / "bytegru.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ByteGRU().eval(), (torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 1, 24)),
                          str(onnx_file), input_names=["x", "h0"], output_names=["y", "hn"], dynamo=False,
                          dynamic_axes={"x": {0: "B", 1: "T"}, "h0": {1: "B"}, "y": {0: "B", 1: "T"},
                                        "hn": {1: "B"}})  # fmt: skip
    manifest, _ = import_onnx(onnx_file, tmp_path / "model", name="bytegru", vocab=256)
    assert manifest.vocab == 256 and [s.input for s in manifest.states] == ["h0"]
    offline = bytes(Generator(tmp_path / "model").generate("the ", max_bytes=40, temperature=0.7, seed=3))
    with running_server(model_dirs=[tmp_path / "model"]) as srv, Client(srv.address) as client:
        served = b"".join(g.text for g in client.generate("the ", 40, temperature=0.7, seed=3, model="bytegru"))
    assert served == offline and len(served) == 40


# -- a manifest that contradicts its graph -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d["states"][0].update(input="h_zero"), "'h_zero' is not in the graph"),
        (lambda d: d["states"][0].update(shape=[3, "B", 16]), "has shape [3, 'B', 16], the graph's is"),
        (lambda d: d["states"][0].update(dtype="float16"), "is float16, the graph's is tensor(float)"),
        (lambda d: d["states"].append({"input": "x", "output": "y", "dtype": "float32", "shape": ["B"]}), "twice"),
    ],
    ids=["unknown-state", "state-shape", "state-dtype", "x-as-state"],
)
def test_a_manifest_whose_states_contradict_the_graph_fails_at_startup_in_one_line(model_dirs, tmp_path, edit, says):
    import json
    import shutil

    from prometheus_client import CollectorRegistry

    from cellserve.model.manifest import ManifestError
    from cellserve.server.metrics import Metrics
    from cellserve.server.models import ModelRepository
    from cellserve.server.settings import Settings

    d = tmp_path / "gru"
    shutil.copytree(model_dirs["gru"], d)
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as e:
        ModelRepository.load(Settings(model_dirs=[d], metrics_port=0), Metrics(CollectorRegistry()))
    assert says in str(e.value) and str(d) in str(e.value) and "\n" not in str(e.value), str(e.value)
