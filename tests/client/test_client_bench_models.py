"""`cellserve bench` against models that are not our LSTM (issue 25): a GRU, a per-frame model with a constant and
a dynamic frame, three states of different shapes, a batch fixed at 1, float16 state.

Each is built by ``tests/own_model/state_models.py`` and imported as a user would. The naive baseline must carry
every state through its client and give the server's outputs; raw onnxruntime must feed every state back; the
bench must run all three baselines and report sane ratios; the soak's inputs must follow each model.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellserve.client import Client, StepRejected
from cellserve.client.bench.baselines import naive
from cellserve.client.bench.baselines.onnx_model import OnnxModel
from cellserve.client.bench.baselines.ort import ort_ceiling
from cellserve.client.bench.load import DYNAMIC_DIM
from cellserve.client.bench.soak.inputs import UncheckedInfo, bad_step, good_step, output_fits
from cellserve.server.cli import main as cellserve_main

OWN_MODEL = Path(__file__).resolve().parents[1] / "own_model"  # state_models.py: one tiny model per class
NAMES = ("gru", "per_frame", "three_state", "fixed_batch", "fp16_state")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each class built, exported and imported with ``import_onnx``: name -> model directory."""
    if str(OWN_MODEL) not in sys.path:
        sys.path.insert(0, str(OWN_MODEL))
    from state_models import MODELS

    from cellserve.model.importer import import_onnx

    dirs = {}
    for name in NAMES:
        tmp = tmp_path_factory.mktemp(name)
        import_onnx(MODELS[name].build(tmp), tmp / "model", name=name, **MODELS[name].import_kwargs)
        dirs[name] = tmp / "model"
    return dirs


def test_onnx_model_knows_every_state_pair_constant_and_frame(model_dirs):
    gru, frame, three = (OnnxModel.load(model_dirs[n]) for n in ("gru", "per_frame", "three_state"))
    assert [(s.input, s.output, s.batch_axis) for s in gru.states] == [("h0", "hn", 1)] and gru.lstm is None
    assert [(s.input, s.batch_axis) for s in three.states] == [("cache", 0), ("h0", 1), ("c0", 1)]
    assert [z.shape for z in three.zero_states(3)] == [(3, 4, 2), (1, 3, 16), (1, 3, 16)]
    assert three.session_state_bytes == (4 * 2 + 16 + 16) * 4
    assert not frame.time_axis and frame.frame == (None,) and list(frame.consts) == ["sr"]
    assert frame.step_frame == frame.example  # the dynamic frame at the manifest's example, as the load sends it
    fixed, half = OnnxModel.load(model_dirs["fixed_batch"]), OnnxModel.load(model_dirs["fp16_state"])
    assert fixed.fixed_batch == 1 and gru.fixed_batch is None
    assert {s.dtype for s in half.states} == {"float16"} and half.session_state_bytes == 2 * 2 * 16 * 2


def test_a_per_frame_step_runs_its_frames_one_after_another_with_the_state_carried(model_dirs):
    """``OnnxModel.run`` of T frames equals T one-frame steps chained by hand, and the frames change the state."""
    m = OnnxModel.load(model_dirs["per_frame"])
    x = m.sample_input(np.random.default_rng(0), 2, 3)  # [B, T, N]
    assert x.shape == (2, 3, *m.example)
    y, states = m.run(x, m.zero_states(2))
    assert y.shape == (2, 3, 1)
    chained, ys = m.zero_states(2), []
    for t in range(3):
        y_t, chained = m.run(x[:, t : t + 1], chained)
        ys.append(y_t)
    np.testing.assert_array_equal(np.concatenate(ys, axis=1), y)
    np.testing.assert_array_equal(states[0], chained[0])
    assert np.abs(states[0]).max() > 0


def test_ort_ceiling_feeds_every_state_back_and_runs_a_fixed_batch_graph_at_batch_1(model_dirs):
    three = ort_ceiling(OnnxModel.load(model_dirs["three_state"]), batch=4, t=2, seconds=0.05)
    assert (three.batch, three.t, three.fixed_batch) == (4, 2, None) and three.calls >= 5
    fixed = ort_ceiling(OnnxModel.load(model_dirs["fixed_batch"]), batch=8, t=2, seconds=0.05)
    assert (fixed.batch, fixed.fixed_batch) == (1, 1)  # all the graph can run: the report says so
    assert math.isclose(fixed.steps_per_s, 2 / fixed.s_per_call)
    frames = ort_ceiling(OnnxModel.load(model_dirs["per_frame"]), batch=3, t=4, seconds=0.05)
    assert (frames.batch, frames.t) == (3, 4)


def _naive_outputs(model_dir: Path, model: OnnxModel, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """One session through the naive server: every chunk sent with the state the last reply returned."""

    async def main() -> list[np.ndarray]:
        server, port = await naive.start(model_dir)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                method = ch.unary_unary(naive.METHOD, request_serializer=bytes, response_deserializer=bytes)
                state, ys = bytes(model.session_state_bytes), []
                for chunk in chunks:
                    reply = await method(naive.encode_request(chunk[None], state, naive.dynamic_axes(model.frame)))
                    y, state = naive.decode_reply(reply, model.session_state_bytes)
                    ys.append(y.reshape(len(chunk), *model.out_frame))
                assert len(state) == model.session_state_bytes and any(state)  # every state went round the client
                return ys
        finally:
            await server.stop(0)

    return asyncio.run(main())


@pytest.mark.parametrize("name", NAMES)
def test_the_naive_baseline_gives_the_servers_outputs_for_the_same_inputs(name, model_dirs, running_server):
    model = OnnxModel.load(model_dirs[name])
    rng = np.random.default_rng(1)
    chunks = [model.sample_input(rng, 1, t)[0] for t in (2, 1, 3)]  # [T, *frame] each
    if name == "per_frame":  # a dynamic frame: each message may carry another length
        chunks.append(rng.standard_normal((2, 80)).astype(np.float32))
    with running_server(model_dirs=[model_dirs[name]]) as srv, Client(srv.address) as client, client.session() as s:
        want = [s.step(chunk) for chunk in chunks]
    got = _naive_outputs(model_dirs[name], model, chunks)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gru", "per_frame", "three_state"])
def test_bench_runs_every_baseline_against_the_model_and_reports_sane_ratios(name, model_dirs, tmp_path):
    out = tmp_path / "bench"
    # --duration, not --messages: a count-bound window can close before the bench reads the server's metrics
    # (a loaded machine), leaving no mean batch to run raw ORT at
    argv = ["bench", "--model-dir", str(model_dirs[name]), "--streams", "2", "-T", "3", "--duration", "0.6",
            "--warmup", "0.1", "--procs", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cellserve_main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    meta, (cfg,) = report["meta"], report["configs"]
    model = OnnxModel.load(model_dirs[name])
    assert meta["model"]["name"] == name and len(meta["model"]["states"]) == len(model.states)
    assert meta["model"]["time_axis"] == model.time_axis
    assert meta["frame_sent"] == list(model.step_frame) and meta["onnx_model"]["fixed_batch"] is None
    for target in ("cellserve", "echo", "naive"):
        got = cfg["cellserve"] if target == "cellserve" else cfg["baselines"][target]
        assert got["messages"] >= 10 and got["msgs_per_s"] > 0, target
    ort = cfg["baselines"]["ort"]
    assert ort["t"] == 3 and ort["batch"] == max(1, round(cfg["cellserve"]["mean_batch"]))
    r = cfg["ratios"]
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("msgs_vs_echo", "msgs_vs_naive", "steps_vs_ort"))
    assert r["msgs_vs_echo"] < 3  # cellserve does all echo does and runs a model: never far ahead of it
    assert r["steps_vs_ort"] < 1.5  # nor of onnxruntime in-process at its own batch, gRPC and all
    assert r["engine_vs_ort"] > 0.25  # an engine call runs the same graph: it cannot be much faster than raw ORT


@pytest.mark.parametrize("name", ["per_frame", "three_state", "fp16_state"])
def test_every_injected_bad_step_is_invalid_argument_and_good_steps_fit_the_model(name, model_dirs, running_server):
    """The soak's inputs follow the model: valid chunks are answered with [T, *output_frame]; every invalid kind
    (NaN, Inf, wrong dtype, rank, width where the frame has a fixed dim, empty) is refused in-stream."""
    rng = np.random.default_rng(0)
    with running_server(model_dirs=[model_dirs[name]]) as srv, Client(srv.address) as client, client.session() as s:
        info = s.info
        x = good_step(info, 3, rng)
        assert x.shape == (3, *(DYNAMIC_DIM if d < 0 else d for d in info.frame)) and x.dtype == info.input_dtype
        assert output_fits(s.step(x), info, 3)
        seen: set[str] = set()
        for _ in range(60):
            kind, x = bad_step(info, rng)
            seen.add(kind)
            s.info = UncheckedInfo.of(info)
            with pytest.raises(StepRejected) as e:
                s.step(x)
            s.info = info
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (kind, e.value)
            assert output_fits(s.step(good_step(info, 2, rng)), info, 2)
    fixed_dim = any(d > 0 for d in info.frame)
    assert seen == {"nan", "inf", "float64", "wrong_rank", "empty"} | ({"wrong_width"} if fixed_dim else set())


def test_output_fits_takes_any_size_for_a_dynamic_dim_only():
    from cellserve.client.model_info import ModelInfo

    info = ModelInfo("m", "1", "0", "features", 0, 0, 0, 0, input_dtype="float32", frame=(-1,), output_frame=(-1, 3))
    assert output_fits(np.zeros((2, 7, 3)), info, 2) and output_fits(np.zeros((2, 1, 3)), info, 2)
    assert not output_fits(np.zeros((2, 7, 4)), info, 2)
    assert not output_fits(np.zeros((3, 7, 3)), info, 2) and not output_fits(np.zeros((2, 3)), info, 2)
